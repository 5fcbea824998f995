//! The runtime that hosts aggregates: a [`Runtime`] over an
//! [`EventStore`], and per aggregate type an [`Aggregates`] handle whose
//! `execute` routes each command to the one actor of its stream (spawned on
//! first use, recovered from snapshot plus tail, passivated when idle). The
//! runtime also owns the projections it started, and stops everything in
//! order at [`Runtime::shutdown`]. The actors and their messages stay
//! private; callers only hold handles.

mod actor;
mod command_id;
mod config;
mod registry;

use std::any::{type_name, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, MessagingErr, SpawnErr, SupervisionEvent,
};
use tokio::sync::{mpsc, OnceCell};
use tokio::time::{timeout_at, Instant};
use tracing::{debug, field, instrument, warn, Span};
use uuid::Uuid;

use crate::error::{ProjectionControlError, StoreError};
use crate::event::{Position, StreamId, Version};
use crate::projection::{Projection, ProjectionConfig, ProjectionHandle, ProjectionState};
use crate::store::sled::SledStore;
use crate::store::EventStore;

pub(crate) use self::command_id::derived_id;
pub use self::command_id::{
    command_fingerprint, derived_event_id, COMMAND_FINGERPRINT_KEY, COMMAND_ID_KEY,
};
pub use self::config::{AggregateSettings, RuntimeConfig, RuntimeConfigBuilder};
pub use crate::aggregate::Aggregate;
pub use crate::error::{CategoryError, CommandError, QueryError};

use self::actor::{
    rebuild, AggregateActor, ExecuteRequest, LoadError, Reply, Request, StateRequest,
};
use self::config::TypeSettings;
use self::registry::{Refused, Registry, Slot, SlotKey};

/// What a command carries besides itself: the ids and tags stored on every
/// event it produces, the version the caller expects the stream at, and
/// whether the answer includes the new state. Build it with
/// `CommandContext::default()` and the methods below.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandContext {
    /// The id of the conversation the command belongs to.
    pub correlation_id: Option<Uuid>,
    /// The id of the message that caused the command.
    pub causation_id: Option<Uuid>,
    /// Small string tags (user id, tenant, ...) stored in the metadata of
    /// every event of the command ([`crate::store::Metadata::extra`]). Keys follow
    /// the store's rules for metadata keys, and the tags count toward each
    /// event's size limit: a bad key is [`CommandError::InvalidInput`].
    pub metadata: BTreeMap<String, String>,
    /// The version the caller saw (EventStoreDB's expected revision): when
    /// the stream is at another version, the command fails with
    /// [`CommandError::WrongExpectedVersion`] and is not retried.
    /// `Version(0)`: the aggregate must have no event yet.
    pub expected_version: Option<Version>,
    /// Whether [`Executed::state`] carries the state after the command
    /// (Commanded's `returning: :aggregate_state`).
    pub return_state: bool,
    /// The caller's id for this command (an idempotency key): see
    /// [`CommandContext::with_command_id`].
    pub command_id: Option<Uuid>,
}

impl CommandContext {
    /// A context with both ids.
    pub fn new(correlation_id: Uuid, causation_id: Uuid) -> Self {
        Self {
            correlation_id: Some(correlation_id),
            causation_id: Some(causation_id),
            ..Self::default()
        }
    }

    /// Adds the tag `key = value` to the metadata of every event of the
    /// command (replacing an earlier value of `key`).
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Runs the command only if the stream is at `version` (see
    /// [`CommandContext::expected_version`]).
    pub fn expecting(mut self, version: Version) -> Self {
        self.expected_version = Some(version);
        self
    }

    /// Makes the command run at most once on its aggregate (invariant I7):
    /// sent again with the same `id` (after a timeout, a crash, a
    /// re-delivery, a restart, on any backend), it answers with the
    /// original outcome (its events, version and position, decoded from
    /// the store) and stores nothing new, even if the aggregate has moved
    /// on since.
    ///
    /// How: the command's event ids are derived from `id`, its stream and
    /// each event's index ([`derived_event_id`]), and its events carry `id`
    /// and a fingerprint of the command in their metadata
    /// ([`COMMAND_ID_KEY`], [`COMMAND_FINGERPRINT_KEY`]). Before deciding,
    /// the actor looks the first derived id up (one indexed read); a retry
    /// racing the first run from another process is answered by the store's
    /// idempotent append. The guarantee lasts as long as those events are
    /// in the log (forever: the log is append-only).
    ///
    /// Only a command that stored events is remembered: one the domain
    /// refused, or that had nothing to do, is decided again by a retry.
    /// The same `id` on another aggregate is another command. The same
    /// `id` with another command (another `Debug` text) fails with
    /// [`CommandError::CommandIdReused`] and stores nothing.
    pub fn with_command_id(mut self, id: Uuid) -> Self {
        self.command_id = Some(id);
        self
    }

    /// Asks for the state after the command in [`Executed::state`].
    pub fn returning_state(mut self) -> Self {
        self.return_state = true;
        self
    }
}

/// A committed command: its events, durable in the store (for the sled store
/// with default durability, on disk) in this order, all or none.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Executed<A: Aggregate> {
    /// The events, in stream order. Empty when the command had nothing to do
    /// (then nothing was stored).
    pub events: Vec<A::Event>,
    /// The version of the command's last event. For a command that stored
    /// nothing, the version of the state it was decided on: the stream's
    /// at that check, or behind it when another writer kept moving it past
    /// the retries ([`RuntimeConfig::max_conflict_retries`]).
    pub version: Version,
    /// The global position of the last event; `None` when there was none.
    pub position: Option<Position>,
    /// The aggregate's state after the command, at `version`, when the
    /// context asked for it ([`CommandContext::returning_state`]); `None`
    /// otherwise.
    pub state: Option<A>,
}

/// Hosts aggregates over one store of type `S` (any [`EventStore`]; by
/// default `dyn EventStore`), and owns the projections it started.
///
/// Guarantees, per stream: one actor at a time however many tasks race on
/// it; its commands run one at a time in arrival order; state recovered from
/// a snapshot equals state from a full replay. Different streams run in
/// parallel and share the store's group commits.
///
/// The runtime keeps the store's own type, so that `Runtime::open(path)`
/// gives a `Runtime<SledStore>` whose [`Runtime::store`] is the
/// `Arc<SledStore>` a sled read model needs: one setup serves everything.
///
/// Cloning is cheap and every clone is the same runtime. Call
/// [`Runtime::shutdown`] to stop it: nothing relies on `Drop` (dropping every
/// handle without it loses nothing acknowledged, but live actors keep the
/// store open until they passivate).
pub struct Runtime<S: ?Sized = dyn EventStore> {
    core: Arc<Core>,
    store: Arc<S>,
}

impl<S: ?Sized> Clone for Runtime<S> {
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
            store: Arc::clone(&self.store),
        }
    }
}

/// A store the runtime can hold both as its own type and as
/// `dyn EventStore` (which its actors use). Implemented for every sized
/// [`EventStore`] and for `dyn EventStore`; there is nothing to implement.
pub trait RuntimeStore: EventStore {
    /// The same store, as a `dyn EventStore`.
    fn into_dyn(self: Arc<Self>) -> Arc<dyn EventStore>;
}

impl<S: EventStore> RuntimeStore for S {
    fn into_dyn(self: Arc<Self>) -> Arc<dyn EventStore> {
        self
    }
}

impl RuntimeStore for dyn EventStore {
    fn into_dyn(self: Arc<Self>) -> Arc<dyn EventStore> {
        self
    }
}

/// What every handle of one runtime shares. Not generic over the store, so
/// that [`Aggregates`] handles are the same whatever the store's type.
struct Core {
    store: Arc<dyn EventStore>,
    config: Arc<RuntimeConfig>,
    registry: Arc<Registry>,
    supervisor: OnceCell<ActorRef<()>>,
    /// Category to (aggregate type, its name), for the checks done when a
    /// type is first used. A std mutex: no await while it is held.
    categories: Mutex<HashMap<&'static str, (TypeId, &'static str)>>,
    /// Every actor holds a clone (see [`actor::Unregister`]); shutdown takes
    /// this one, and `None` means no new actor may start.
    actors_alive: Mutex<Option<mpsc::Sender<()>>>,
    /// Ends (`recv` gives `None`) once every actor's clone is dropped.
    actors_gone: tokio::sync::Mutex<mpsc::Receiver<()>>,
    /// The projections started through the runtime (or adopted), stopped by
    /// its shutdown before the store.
    services: Mutex<Vec<ProjectionHandle>>,
    /// The workflows started through the runtime, stopped first by its
    /// shutdown (they send commands).
    /// `None` once shutdown has collected them: no workflow may start.
    workflows: Mutex<Option<Vec<crate::workflow::WorkflowHandle>>>,
    /// The first shutdown's result, returned again to later calls. A tokio
    /// mutex: concurrent calls wait for the first, across its awaits.
    shutdown: tokio::sync::Mutex<Option<Result<(), StoreError>>>,
}

impl<S: ?Sized + fmt::Debug> fmt::Debug for Runtime<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("store", &self.store)
            .field("config", &self.core.config)
            .field("live_aggregates", &self.core.registry.live())
            .finish()
    }
}

impl Runtime<SledStore> {
    /// A runtime with the default configuration over the sled store at
    /// `path` (created if missing), with its default durability: an
    /// acknowledged command is on disk. [`Runtime::store`] is the
    /// `Arc<SledStore>`, for sled read models.
    ///
    /// # Errors
    /// As [`SledStore::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let store = SledStore::open(path)?;
        Ok(Self::new(Arc::new(store), RuntimeConfig::default()))
    }
}

impl<S: ?Sized + RuntimeStore> Runtime<S> {
    /// A runtime over `store`. No actor runs until the first command.
    pub fn new(store: Arc<S>, config: RuntimeConfig) -> Self {
        let (alive, gone) = mpsc::channel(1);
        Self {
            core: Arc::new(Core {
                store: Arc::clone(&store).into_dyn(),
                config: Arc::new(config),
                registry: Arc::new(Registry::default()),
                supervisor: OnceCell::new(),
                categories: Mutex::new(HashMap::new()),
                actors_alive: Mutex::new(Some(alive)),
                actors_gone: tokio::sync::Mutex::new(gone),
                services: Mutex::new(Vec::new()),
                workflows: Mutex::new(Some(Vec::new())),
                shutdown: tokio::sync::Mutex::new(None),
            }),
            store,
        }
    }

    /// The store, with its own type (for reads, sled read models, and in
    /// tests for writing as another writer).
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.core.config
    }

    /// The handle for aggregates of type `A`. A type that
    /// [`Runtime::try_aggregates`] refuses gives a handle whose every call
    /// fails with that error ([`CommandError::Category`],
    /// [`QueryError::Category`]).
    pub fn aggregates<A: Aggregate>(&self) -> Aggregates<A> {
        let settings = self.core.register::<A>();
        Aggregates {
            core: Arc::clone(&self.core),
            settings,
            aggregate: PhantomData,
        }
    }

    /// The handle for aggregates of type `A`, once the type is checked: its
    /// category has no `-` (its streams `CATEGORY-id` would belong to
    /// another category), makes valid stream ids, and is not used by
    /// another aggregate type on this runtime.
    ///
    /// # Errors
    /// [`CategoryError`] saying which rule the type breaks.
    pub fn try_aggregates<A: Aggregate>(&self) -> Result<Aggregates<A>, CategoryError> {
        let handle = self.aggregates::<A>();
        handle.settings.as_ref().map_err(Clone::clone)?;
        Ok(handle)
    }

    /// How many aggregate actors are live (taking commands) now.
    pub fn live_aggregates(&self) -> usize {
        self.core.registry.live()
    }

    /// Starts `projection` on the runtime's store (as
    /// [`ProjectionHandle::spawn`]) and keeps it, so that
    /// [`Runtime::shutdown`] catches it up and saves its checkpoint before
    /// it shuts the store down.
    ///
    /// # Errors
    /// As [`ProjectionHandle::spawn`]; after shutdown has begun,
    /// [`ProjectionControlError::Store`] with [`StoreError::Closed`].
    pub async fn start_projection<P: Projection>(
        &self,
        config: ProjectionConfig,
        projection: P,
    ) -> Result<ProjectionHandle, ProjectionControlError> {
        if self.core.registry.is_shut_down() {
            return Err(ProjectionControlError::Store(StoreError::Closed));
        }
        let handle =
            ProjectionHandle::spawn(Arc::clone(&self.core.store), config, projection).await?;
        if let Err(refused) = self.adopt(handle.clone()) {
            // The runtime's shutdown began while it started: it will not
            // stop this one, so stop it here, before the store closes.
            let _ = refused.shutdown().await;
            return Err(ProjectionControlError::Store(StoreError::Closed));
        }
        Ok(handle)
    }

    /// Makes the runtime own a projection started by hand (for example a
    /// [`ProjectionHandle::spawn_sled`] read model on [`Runtime::store`]):
    /// its shutdown then catches it up and saves its checkpoint before the
    /// store shuts down. A projection the runtime does not own must be shut
    /// down before the runtime: afterwards its final checkpoint save meets a
    /// closed store and fails, leaving the checkpoint at its last save.
    ///
    /// # Errors
    /// The handle back, when the runtime's shutdown has already begun (shut
    /// it down yourself).
    pub fn adopt(&self, handle: ProjectionHandle) -> Result<(), ProjectionHandle> {
        let mut services = lock(&self.core.services);
        // Checked under the lock that shutdown takes to collect them: a
        // handle is either collected or refused.
        if self.core.registry.is_shut_down() {
            return Err(handle);
        }
        services.push(handle);
        Ok(())
    }

    /// Starts the process manager `manager` on this runtime (see
    /// [`crate::workflow::ProcessManager`]): it follows the log from its
    /// checkpoint `workflow:NAME`, and the runtime owns it, so that
    /// [`Runtime::shutdown`] stops it before anything else. One runner per
    /// workflow name and store: two processes running the same workflow on
    /// one PostgreSQL store would both decide (each command still runs
    /// once per command id, but their records would conflict).
    ///
    /// # Errors
    /// [`crate::workflow::WorkflowError::InvalidName`] for a name that is
    /// not a category without `-`;
    /// [`crate::workflow::WorkflowError::AlreadyRunning`] when one of that
    /// name runs on this runtime; [`crate::workflow::WorkflowError::Stopped`]
    /// after shutdown has begun; the store's, while loading its instances.
    pub async fn start_workflow<P: crate::workflow::ProcessManager>(
        &self,
        manager: P,
        config: crate::workflow::WorkflowConfig,
    ) -> Result<crate::workflow::WorkflowHandle, crate::workflow::WorkflowError> {
        use crate::workflow::WorkflowError;
        let stopped = || WorkflowError::Stopped {
            name: P::NAME.to_owned(),
        };
        if self.core.registry.is_shut_down() {
            return Err(stopped());
        }
        if self.workflow(P::NAME).is_ok() {
            return Err(WorkflowError::AlreadyRunning {
                name: P::NAME.to_owned(),
            });
        }
        let handle = crate::workflow::start(manager, Arc::clone(&self.core.store), config).await?;
        // Decided under the lock that shutdown takes to collect them.
        let refused = {
            match &mut *lock(&self.core.workflows) {
                Some(workflows)
                    if workflows
                        .iter()
                        .any(|w| crate::workflow::same_name(w, P::NAME)) =>
                {
                    Some(true)
                }
                Some(workflows) => {
                    workflows.push(handle.clone());
                    None
                }
                None => Some(false),
            }
        };
        if let Some(taken) = refused {
            handle.shutdown().await;
            return Err(if taken {
                WorkflowError::AlreadyRunning {
                    name: P::NAME.to_owned(),
                }
            } else {
                stopped()
            });
        }
        Ok(handle)
    }

    /// The handle of the workflow named `name` that this runtime runs.
    ///
    /// # Errors
    /// [`crate::workflow::WorkflowError::Unknown`] when none of that name
    /// was started on it.
    pub fn workflow(
        &self,
        name: &str,
    ) -> Result<crate::workflow::WorkflowHandle, crate::workflow::WorkflowError> {
        lock(&self.core.workflows)
            .iter()
            .flatten()
            .find(|w| crate::workflow::same_name(w, name))
            .cloned()
            .ok_or_else(|| crate::workflow::WorkflowError::Unknown {
                name: name.to_owned(),
            })
    }

    /// Stops the runtime, in order:
    /// 0. each workflow it runs stops (its page in hand finishes);
    /// 1. new commands fail with [`CommandError::ShutDown`];
    /// 2. commands already accepted run to the end and every actor stops
    ///    (finishing its snapshot in flight);
    /// 3. each projection the runtime owns ([`Runtime::start_projection`],
    ///    [`Runtime::adopt`]) handles every event up to the store's last
    ///    commit and saves its checkpoint;
    /// 4. the store shuts down (drains its writer and flushes).
    ///
    /// Each wait is bounded by [`RuntimeConfig::command_timeout`] (a paused
    /// or failed projection is shut down where it is). It waits on
    /// channels, never by polling. Calling it again, or concurrently,
    /// returns the first call's result once it is done.
    ///
    /// # Errors
    /// The store's, from its final flush, or from a projection's final
    /// checkpoint save (the shutdown goes on to the store).
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        let mut first = self.core.shutdown.lock().await;
        if let Some(result) = &*first {
            return result.clone();
        }
        let result = self.core.shut_down().await;
        *first = Some(result.clone());
        result
    }
}

/// Locks a std mutex, taking over a poisoned one: the data it guards (lists
/// and maps changed in one step) is never left half-changed.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Core {
    /// Checks `A`'s category the first time the type is used (see
    /// [`Runtime::try_aggregates`]) and resolves its settings.
    fn register<A: Aggregate>(&self) -> Result<TypeSettings, CategoryError> {
        let aggregate = type_name::<A>();
        let category = A::CATEGORY;
        if category.contains('-') {
            return Err(CategoryError::ContainsSeparator {
                aggregate,
                category,
            });
        }
        StreamId::new(category).map_err(|source| CategoryError::Invalid {
            aggregate,
            category,
            source,
        })?;
        let mut categories = lock(&self.categories);
        let (registered, name) = *categories
            .entry(category)
            .or_insert((TypeId::of::<A>(), aggregate));
        if registered != TypeId::of::<A>() {
            return Err(CategoryError::Shared {
                category,
                registered: name,
                refused: aggregate,
            });
        }
        Ok(self.config.settings_of(TypeId::of::<A>()))
    }

    async fn shut_down(&self) -> Result<(), StoreError> {
        // Workflows first: they send commands, which must still run.
        let workflows = lock(&self.workflows).take().unwrap_or_default();
        for workflow in workflows {
            workflow.shutdown().await;
        }
        let asked = self.registry.shut_down();
        debug!(asked, "runtime shutting down");
        // Actors with pending commands stop by themselves after the last.
        // Each holds a clone of the sender: once ours is dropped, `recv`
        // ends when the last actor's handler (and its store handle) is gone.
        drop(lock(&self.actors_alive).take());
        let deadline = deadline_after(
            self.config
                .command_timeout()
                .saturating_add(Duration::from_secs(1)),
        );
        let drained = timeout_at(deadline, async {
            self.actors_gone.lock().await.recv().await;
        })
        .await;
        if drained.is_err() {
            warn!(
                running = self.registry.running(),
                "actors still running at shutdown"
            );
        }
        if let Some(supervisor) = self.supervisor.get() {
            supervisor.stop(None);
        }
        let mut result = Ok(());
        // No command runs any more: the head is the last commit the
        // projections must reach.
        let head = self.store.head_position();
        let services = std::mem::take(&mut *lock(&self.services));
        for service in services {
            if let Err(error) = self.stop_service(&service, head).await {
                result = result.and(Err(error));
            }
        }
        let stored = self.store.shutdown().await;
        result.and(stored)
    }

    /// Catches `service` up to `head` (unless it is paused or stopped) and
    /// shuts it down, which saves its checkpoint.
    async fn stop_service(
        &self,
        service: &ProjectionHandle,
        head: Position,
    ) -> Result<(), StoreError> {
        let state = service.status().state;
        if !matches!(
            state,
            ProjectionState::Paused
                | ProjectionState::Stopped
                | ProjectionState::Failed
                | ProjectionState::Ended
        ) {
            if let Err(error) = service.wait_for(head, self.config.command_timeout()).await {
                warn!(projection = service.name(), %error, "projection not caught up at shutdown");
            }
        }
        match service.shutdown().await {
            Ok(checkpoint) => {
                debug!(projection = service.name(), %checkpoint, "projection stopped");
                Ok(())
            }
            Err(ProjectionControlError::Store(error)) => Err(error),
            Err(error) => {
                warn!(projection = service.name(), %error, "projection had stopped before shutdown");
                Ok(())
            }
        }
    }

    async fn supervisor(&self) -> Result<ActorCell, String> {
        self.supervisor
            .get_or_try_init(|| async {
                let supervisor = Supervisor {
                    registry: Arc::clone(&self.registry),
                };
                Actor::spawn(None, supervisor, ())
                    .await
                    .map(|(actor, _)| actor)
                    .map_err(|e| e.to_string())
            })
            .await
            .map(ActorRef::get_cell)
    }

    /// The actor of `slot`, spawned (and recovered) by the first caller.
    /// The spawn runs in its own task, so that a caller that gives up
    /// (timeout, cancellation) never leaves a half-started actor.
    async fn actor_for<A: Aggregate>(
        self: &Arc<Self>,
        key: &SlotKey,
        slot: &Arc<Slot>,
        settings: TypeSettings,
    ) -> Result<ActorCell, NoActor> {
        if let Some(cell) = slot.actor.get() {
            return Ok(cell.clone());
        }
        let core = Arc::clone(self);
        let key = key.clone();
        let slot = Arc::clone(slot);
        tokio::spawn(async move {
            let mut published = false;
            let (publishing, slot_ref) = (&mut published, &slot);
            let cell = slot
                .actor
                .get_or_try_init(|| async move {
                    // Set only when this task's init runs; it returns early
                    // below if that init fails.
                    *publishing = true;
                    core.spawn_actor::<A>(&key, slot_ref, settings).await
                })
                .await?
                .clone();
            // Every caller waiting for this actor may have given up and the
            // slot closed before it was published: see `stop_if_drained`.
            // Only the task that published it changed anything to check.
            if published {
                slot.stop_if_drained();
            }
            Ok(cell)
        })
        .await
        .map_err(|e| NoActor::Failed(SpawnFailure::Other(e.to_string())))?
    }

    async fn spawn_actor<A: Aggregate>(
        &self,
        key: &SlotKey,
        slot: &Arc<Slot>,
        settings: TypeSettings,
    ) -> Result<ActorCell, NoActor> {
        if slot.is_closed() {
            // The spawn this caller waited for failed: its error, not
            // another replay. Closed for any other reason: look again.
            return Err(slot.failure.get().map_or(NoActor::Retry, |failure| {
                NoActor::Failed((**failure).clone())
            }));
        }
        let Some(alive) = lock(&self.actors_alive).clone() else {
            return Err(NoActor::ShutDown);
        };
        // Not cached: the slot stays open, and the next caller tries the
        // supervisor's spawn again.
        let supervisor = self
            .supervisor()
            .await
            .map_err(|e| NoActor::Failed(SpawnFailure::Other(e)))?;
        let actor = AggregateActor::<A> {
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
            settings,
            registry: Arc::clone(&self.registry),
            key: key.clone(),
            slot: Arc::clone(slot),
            aggregate: PhantomData,
            unregister: actor::Unregister {
                registry: Arc::clone(&self.registry),
                id: std::sync::OnceLock::new(),
                _alive: alive,
            },
        };
        match Actor::spawn_linked(None, actor, (), supervisor).await {
            Ok((actor, _)) => {
                self.registry
                    .evict_if_over(self.config.max_live_aggregates());
                Ok(actor.get_cell())
            }
            Err(error) => {
                let failure = match error {
                    SpawnErr::StartupFailed(error) => match error.downcast::<LoadError>() {
                        Ok(load) => SpawnFailure::Load(*load),
                        // A panic in recovery outside `apply` (in `Default`
                        // or a snapshot's `Deserialize`), or ractor's error.
                        Err(other) => SpawnFailure::Other(other.to_string()),
                    },
                    other => SpawnFailure::Other(other.to_string()),
                };
                // Set before the close, which is what waiters check first.
                let _ = slot.failure.set(Box::new(failure.clone()));
                // Nobody may queue behind an actor that will never run.
                slot.close();
                self.registry.remove(key, slot);
                Err(NoActor::Failed(failure))
            }
        }
    }
}

/// Why an actor could not be had.
#[derive(Debug)]
enum NoActor {
    /// The slot closed meanwhile: look the stream up again.
    Retry,
    /// The runtime is shutting down: no new actor starts.
    ShutDown,
    /// The spawn failed.
    Failed(SpawnFailure),
}

/// Why an actor's spawn failed. Kept on its slot ([`Slot::failure`]), so
/// that every caller that waited for that spawn gets a copy.
#[derive(Debug, Clone)]
pub(crate) enum SpawnFailure {
    /// Recovery failed in the runtime's code or in `apply`.
    Load(LoadError),
    /// Anything else: a panic in recovery outside `apply` (`Default`, a
    /// snapshot's `Deserialize`), or ractor or tokio failed.
    Other(String),
}

/// Cleans up after aggregate actors: a stopped or failed actor's slot is
/// removed, so that the next command spawns a fresh actor that reloads from
/// the store. Restarts are on demand, never in a loop.
struct Supervisor {
    registry: Arc<Registry>,
}

impl Actor for Supervisor {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<()>, (): ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<()>,
        event: SupervisionEvent,
        (): &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(actor, _, _) => {
                self.registry.actor_stopped(actor.get_id());
            }
            SupervisionEvent::ActorFailed(actor, error) => {
                warn!(actor = %actor.get_id(), %error, "aggregate actor failed");
                self.registry.actor_stopped(actor.get_id());
            }
            _ => {}
        }
        Ok(())
    }
}

/// The handle for the aggregates of type `A`: routes each command to the one
/// actor of its stream (`A::CATEGORY-id`). Cloning is cheap.
pub struct Aggregates<A> {
    core: Arc<Core>,
    /// The type's settings, or why the runtime refused the type.
    settings: Result<TypeSettings, CategoryError>,
    aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for Aggregates<A> {
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
            settings: self.settings.clone(),
            aggregate: PhantomData,
        }
    }
}

impl<A> fmt::Debug for Aggregates<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aggregates")
            .field("aggregate", &type_name::<A>())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Why a request found no actor to answer it; each caller turns it into its
/// own error type.
#[derive(Debug)]
enum Unreachable {
    ShutDown,
    Overloaded,
    Timeout,
    Load(LoadError),
    /// A panic in recovery, or the actor stopped before answering.
    Panicked(String),
}

impl<A: Aggregate> Aggregates<A> {
    /// The stream id of aggregate `id`: `A::CATEGORY-id`.
    ///
    /// # Errors
    /// [`crate::InvalidInput`] when the id is empty (`order-` names no
    /// order) or makes an invalid stream id.
    pub fn stream_id(id: &str) -> Result<StreamId, crate::InvalidInput> {
        if id.is_empty() {
            return Err(crate::InvalidInput::EmptyName {
                what: "aggregate id",
            });
        }
        StreamId::for_aggregate(A::CATEGORY, id)
    }

    fn key(id: &str) -> Result<SlotKey, crate::InvalidInput> {
        Ok(SlotKey {
            aggregate: TypeId::of::<A>(),
            stream: Self::stream_id(id)?,
        })
    }

    /// Runs `command` on aggregate `id`. See [`Aggregates::execute_with`].
    ///
    /// # Errors
    /// As [`Aggregates::execute_with`].
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        self.execute_with(id, command, CommandContext::default())
            .await
    }

    /// Runs `command` on aggregate `id` and answers with the state after it
    /// too ([`Executed::state`] is `Some`), from the actor that ran it: no
    /// second round trip, and no other command in between.
    ///
    /// # Errors
    /// As [`Aggregates::execute_with`].
    pub async fn execute_returning_state(
        &self,
        id: &str,
        command: A::Command,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        self.execute_with(id, command, CommandContext::default().returning_state())
            .await
    }

    /// Runs `command` on aggregate `id` with `context`: its ids and
    /// metadata are stored on every event, its expected version (if any) is
    /// checked, and its `return_state` fills [`Executed::state`].
    ///
    /// Returns once the events are committed (durable as the store defines).
    /// Commands to one aggregate run one at a time, in the order they
    /// arrive; on a conflict with another writer, or when it stores nothing
    /// but was decided on a state the stream has moved past, the command is
    /// decided again on the caught-up state, up to the configured retries —
    /// unless the context gives an expected version, which is never retried.
    ///
    /// # Errors
    /// [`CommandError::Domain`] when the aggregate refused it;
    /// [`CommandError::WrongExpectedVersion`] when the stream is not at the
    /// context's expected version; the other variants for the
    /// infrastructure: conflict after retries, overload (answered at once),
    /// timeout, a panic in the aggregate, the store, the codec, an invalid
    /// id, a refused aggregate type, a shut-down runtime. See
    /// [`CommandError`] for which of them may have stored something.
    #[instrument(name = "command", skip_all,
        fields(stream = %format_args!("{}-{id}", A::CATEGORY), version = field::Empty))]
    pub async fn execute_with(
        &self,
        id: &str,
        command: A::Command,
        context: CommandContext,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        let settings = self.settings.clone()?;
        let key = Self::key(id)?;
        let deadline = deadline_after(self.core.config.command_timeout());
        let request = ExecuteRequest {
            command,
            context,
            deadline,
            span: Span::current(),
        };
        let stream = &key.stream;
        match self.request(&key, settings, deadline, request).await {
            Ok(answer) => answer,
            Err(Unreachable::ShutDown) => Err(CommandError::ShutDown),
            Err(Unreachable::Overloaded) => Err(CommandError::Overloaded {
                stream: stream.clone(),
                pending: self.core.config.max_pending_commands(),
            }),
            Err(Unreachable::Timeout) => Err(CommandError::Timeout {
                stream: stream.clone(),
                after: self.core.config.command_timeout(),
            }),
            Err(Unreachable::Load(error)) => Err(error.into_command_error(stream)),
            Err(Unreachable::Panicked(message)) => Err(CommandError::AggregatePanicked {
                stream: stream.clone(),
                message,
            }),
        }
    }

    /// The current state of aggregate `id` (the default state if it has no
    /// events): after every command that arrived before this call, and
    /// after every event in the store when it is read (the actor catches up
    /// with other writers first). Starts the aggregate's actor if it is not
    /// live; see [`Aggregates::try_state`] for one that does not for a
    /// stream without events.
    ///
    /// # Errors
    /// As for a command: overload, timeout, a panic while recovering, the
    /// store, the codec, an invalid id, a refused aggregate type, a
    /// shut-down runtime.
    pub async fn state(&self, id: &str) -> Result<A, QueryError> {
        let key = Self::key(id)?;
        Ok(self.live_state(&key).await?.0)
    }

    /// The current state of aggregate `id` as [`Aggregates::state`] gives
    /// it, or `None` when its stream has no event: then no actor is started
    /// (a live actor, if there is one, answers as for `state`).
    ///
    /// # Errors
    /// As [`Aggregates::state`].
    pub async fn try_state(&self, id: &str) -> Result<Option<A>, QueryError> {
        let key = Self::key(id)?;
        self.settings.clone()?;
        if self.core.registry.is_shut_down() {
            return Err(QueryError::ShutDown);
        }
        if !self.is_live(id) {
            let current = self
                .core
                .store
                .stream_version(&key.stream)
                .await
                .map_err(|e| LoadError::Read(e).into_query_error(&key.stream))?;
            if current == Version::NONE {
                return Ok(None);
            }
        }
        let (state, version) = self.live_state(&key).await?;
        Ok((version > Version::NONE).then_some(state))
    }

    /// The state and version from the stream's actor.
    async fn live_state(&self, key: &SlotKey) -> Result<(A, Version), QueryError> {
        let settings = self.settings.clone()?;
        let deadline = deadline_after(self.core.config.command_timeout());
        let stream = &key.stream;
        match self
            .request(key, settings, deadline, StateRequest { deadline })
            .await
        {
            Ok(answer) => answer,
            Err(Unreachable::ShutDown) => Err(QueryError::ShutDown),
            Err(Unreachable::Overloaded) => Err(QueryError::Overloaded {
                stream: stream.clone(),
                pending: self.core.config.max_pending_commands(),
            }),
            Err(Unreachable::Timeout) => Err(QueryError::Timeout {
                stream: stream.clone(),
                after: self.core.config.command_timeout(),
            }),
            Err(Unreachable::Load(error)) => Err(error.into_query_error(stream)),
            Err(Unreachable::Panicked(message)) => Err(QueryError::AggregatePanicked {
                stream: stream.clone(),
                message,
            }),
        }
    }

    /// The state of aggregate `id` as of `version` (time travel), rebuilt
    /// from the store: the latest snapshot at or below `version` if any, then
    /// the events up to it. Read-only: the live actor is neither consulted
    /// nor disturbed. Version 0 gives the default state.
    ///
    /// # Errors
    /// [`QueryError::VersionNotFound`] when the stream has not reached
    /// `version`; the store's and codec's errors; a panic in `apply`; a
    /// refused aggregate type.
    pub async fn state_at(&self, id: &str, version: Version) -> Result<A, QueryError> {
        self.settings.clone()?;
        let stream = Self::stream_id(id)?;
        let store = &self.core.store;
        let current = store
            .stream_version(&stream)
            .await
            .map_err(|e| LoadError::Read(e).into_query_error(&stream))?;
        if version > current {
            return Err(QueryError::VersionNotFound {
                stream,
                requested: version,
                current,
            });
        }
        let rebuilt = rebuild::<A>(&**store, &stream, Some(version))
            .await
            .map_err(|e| e.into_query_error(&stream))?;
        Ok(rebuilt.aggregate)
    }

    /// Whether aggregate `id` has a live actor now (it is in memory).
    pub fn is_live(&self, id: &str) -> bool {
        Self::key(id).is_ok_and(|key| {
            self.core
                .registry
                .get_open(&key)
                .is_some_and(|slot| slot.actor.initialized())
        })
    }

    /// Sends `request` to the stream's actor and waits for its answer
    /// before `deadline`: the one loop shared by commands and queries. A
    /// request the actor could not take (it stopped, or was retired after
    /// a panic) comes back and goes to the actor that replaces it.
    async fn request<R: Request<A>>(
        &self,
        key: &SlotKey,
        settings: TypeSettings,
        deadline: Instant,
        mut request: R,
    ) -> Result<R::Answer, Unreachable> {
        let registry = &self.core.registry;
        loop {
            let (slot, permit, cell) = self.reach(key, settings, deadline).await?;
            let (sender, answer) = tokio::sync::oneshot::channel();
            match cell.send_message(request.into_message(sender.into())) {
                Ok(()) => permit.hand_over(),
                Err(MessagingErr::SendErr(message)) => {
                    // The actor stopped without closing its slot (it failed):
                    // the request never reached it, so send it to a new one.
                    slot.close();
                    registry.remove(key, &slot);
                    match R::from_message(message) {
                        Some(back) => {
                            request = back;
                            continue;
                        }
                        None => {
                            return Err(Unreachable::Panicked(
                                "cannot reach the aggregate's actor".to_owned(),
                            ))
                        }
                    }
                }
                Err(error) => {
                    return Err(Unreachable::Panicked(format!(
                        "cannot reach the aggregate's actor: {error:?}"
                    )))
                }
            }
            match timeout_at(deadline, answer).await {
                Err(_) => return Err(Unreachable::Timeout),
                Ok(Ok(Reply::Done(answer))) => return Ok(answer),
                Ok(Ok(Reply::Bounced(back))) => request = back,
                Ok(Err(_)) if registry.is_shut_down() => return Err(Unreachable::ShutDown),
                Ok(Err(_)) => {
                    return Err(Unreachable::Panicked(
                        "the aggregate's actor stopped before answering".to_owned(),
                    ))
                }
            }
        }
    }

    /// Takes a pending place on the stream's actor, spawning (and
    /// recovering) it if needed, before `deadline`.
    async fn reach(
        &self,
        key: &SlotKey,
        settings: TypeSettings,
        deadline: Instant,
    ) -> Result<(Arc<Slot>, registry::Permit, ActorCell), Unreachable> {
        let registry = &self.core.registry;
        loop {
            let slot = registry.slot(key).ok_or(Unreachable::ShutDown)?;
            let permit = match slot.try_acquire(self.core.config.max_pending_commands()) {
                Ok(permit) => permit,
                // The actor is stopping; the next lookup finds or makes a
                // new slot.
                Err(Refused::Closed) => continue,
                Err(Refused::Overloaded) => return Err(Unreachable::Overloaded),
            };
            match timeout_at(deadline, self.core.actor_for::<A>(key, &slot, settings)).await {
                Err(_) => return Err(Unreachable::Timeout),
                Ok(Ok(cell)) => return Ok((slot, permit, cell)),
                // The slot closed meanwhile; the place is given back on drop.
                Ok(Err(NoActor::Retry)) => continue,
                Ok(Err(NoActor::ShutDown)) => return Err(Unreachable::ShutDown),
                Ok(Err(NoActor::Failed(SpawnFailure::Load(error)))) => {
                    return Err(Unreachable::Load(error))
                }
                Ok(Err(NoActor::Failed(SpawnFailure::Other(message)))) => {
                    return Err(Unreachable::Panicked(message))
                }
            }
        }
    }
}

/// Now plus `timeout`, saturating far in the future (so that
/// `Duration::MAX` means "no timeout" rather than an overflow panic).
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
