//! The runtime that hosts aggregates: a [`Runtime`] over an
//! [`EventStore`], and per aggregate type an [`Aggregates`] handle whose
//! `execute` routes each command to the one actor of its stream (spawned on
//! first use, recovered from snapshot plus tail, passivated when idle). The
//! actors and their messages stay private; callers only hold handles.

mod actor;
mod registry;

use std::any::TypeId;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, MessagingErr, SpawnErr, SupervisionEvent,
};
use tokio::sync::{oneshot, OnceCell};
use tokio::time::{timeout_at, Instant};
use tracing::{debug, field, instrument, warn, Span};
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::error::{CommandError, QueryError, StoreError};
use crate::event::{Position, StreamId, Version};
use crate::store::sled::SledStore;
use crate::store::EventStore;

use self::actor::{rebuild, AggregateActor, AggregateMessage, ExecuteReply, LoadError, StateReply};
use self::registry::{Refused, Registry, Slot, SlotKey};

/// How a [`Runtime`] hosts aggregates. Build it with `RuntimeConfig::default()`
/// and the builder methods.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RuntimeConfig {
    /// A snapshot is taken every this many events of a stream (0: never).
    /// Default 100.
    pub snapshot_every: u64,
    /// An aggregate's actor stops after this long without a command; the
    /// next command reloads it. Default 5 minutes.
    pub idle_timeout: Duration,
    /// Past this many live actors, the least recently used idle ones stop
    /// (down to 90% of it). Default 100,000.
    pub max_live_aggregates: usize,
    /// Commands (and `state` queries, which queue behind them) one
    /// aggregate may have waiting or running; past it, `execute` fails at
    /// once with [`CommandError::Overloaded`] and `state` with
    /// [`QueryError::Overloaded`].
    /// Default 1,024.
    pub max_pending_commands: usize,
    /// How long `execute` waits for an answer, including the aggregate's
    /// recovery. Default 10 seconds.
    pub command_timeout: Duration,
    /// How many times a command is decided again on a caught-up state:
    /// after its append conflicted with another writer, or when it stored
    /// nothing (a domain refusal, or no events) and the stream had moved
    /// past the state it was decided on. Both share this budget. Past it,
    /// a conflict is [`CommandError::Conflict`], and a command that stored
    /// nothing is answered as decided on the last state caught up to.
    /// Default 3.
    pub max_conflict_retries: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            snapshot_every: 100,
            idle_timeout: Duration::from_secs(300),
            max_live_aggregates: 100_000,
            max_pending_commands: 1024,
            command_timeout: Duration::from_secs(10),
            max_conflict_retries: 3,
        }
    }
}

impl RuntimeConfig {
    /// Sets how many events pass between snapshots (0: never).
    pub fn snapshot_every(mut self, events: u64) -> Self {
        self.snapshot_every = events;
        self
    }

    /// Sets the idle time after which an actor stops.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the maximum of live actors (at least 1).
    pub fn max_live_aggregates(mut self, max: usize) -> Self {
        self.max_live_aggregates = max.max(1);
        self
    }

    /// Sets the maximum of pending commands per aggregate (at least 1).
    pub fn max_pending_commands(mut self, max: usize) -> Self {
        self.max_pending_commands = max.max(1);
        self
    }

    /// Sets the command timeout.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets how many times a command is decided again on a caught-up state
    /// (see [`RuntimeConfig::max_conflict_retries`]).
    pub fn max_conflict_retries(mut self, retries: u32) -> Self {
        self.max_conflict_retries = retries;
        self
    }
}

/// Correlation and causation ids stored on every event of a command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandContext {
    /// The id of the conversation the command belongs to.
    pub correlation_id: Option<Uuid>,
    /// The id of the message that caused the command.
    pub causation_id: Option<Uuid>,
}

impl CommandContext {
    /// A context with both ids.
    pub fn new(correlation_id: Uuid, causation_id: Uuid) -> Self {
        Self {
            correlation_id: Some(correlation_id),
            causation_id: Some(causation_id),
        }
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
}

/// Hosts aggregates over one store.
///
/// Guarantees, per stream: one actor at a time however many tasks race on
/// it; its commands run one at a time in arrival order; state recovered from
/// a snapshot equals state from a full replay. Different streams run in
/// parallel and share the store's group commits.
///
/// Cloning is cheap and every clone is the same runtime. Call
/// [`Runtime::shutdown`] to stop it: nothing relies on `Drop` (dropping every
/// handle without it loses nothing acknowledged, but live actors keep the
/// store open until they passivate).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn EventStore>,
    config: Arc<RuntimeConfig>,
    registry: Arc<Registry>,
    supervisor: OnceCell<ActorRef<()>>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("store", &self.inner.store)
            .field("config", &self.inner.config)
            .field("live_aggregates", &self.inner.registry.live())
            .finish()
    }
}

impl Runtime {
    /// A runtime over `store`. No actor runs until the first command.
    pub fn new(store: Arc<dyn EventStore>, config: RuntimeConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                config: Arc::new(config),
                registry: Arc::new(Registry::default()),
                supervisor: OnceCell::new(),
            }),
        }
    }

    /// A runtime with the default configuration over the sled store at
    /// `path` (created if missing), with its default durability: an
    /// acknowledged command is on disk.
    ///
    /// # Errors
    /// As [`SledStore::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let store = SledStore::open(path)?;
        Ok(Self::new(Arc::new(store), RuntimeConfig::default()))
    }

    /// The store, for reads (and, in tests, for writing as another writer).
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The handle for aggregates of type `A`.
    pub fn aggregates<A: Aggregate>(&self) -> Aggregates<A> {
        Aggregates {
            runtime: self.clone(),
            aggregate: PhantomData,
        }
    }

    /// How many aggregate actors are live (taking commands) now.
    pub fn live_aggregates(&self) -> usize {
        self.inner.registry.live()
    }

    /// Stops the runtime: new commands fail with [`CommandError::ShutDown`],
    /// commands already accepted run to the end, every actor stops (finishing
    /// its snapshot in flight), then the store shuts down (which drains its
    /// writer and flushes). Calling it twice is fine.
    ///
    /// # Errors
    /// The store's, from its final flush.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        let asked = self.inner.registry.shut_down();
        debug!(asked, "runtime shutting down");
        // Actors with pending commands stop by themselves after the last;
        // wait for all, but not forever for one stuck in the user's code.
        let deadline = deadline_after(
            self.inner
                .config
                .command_timeout
                .saturating_add(Duration::from_secs(1)),
        );
        while self.inner.registry.running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if self.inner.registry.running() > 0 {
            warn!(
                running = self.inner.registry.running(),
                "actors still running at shutdown"
            );
        }
        if let Some(supervisor) = self.inner.supervisor.get() {
            supervisor.stop(None);
        }
        self.inner.store.shutdown().await
    }

    async fn supervisor(&self) -> Result<ActorCell, String> {
        self.inner
            .supervisor
            .get_or_try_init(|| async {
                let supervisor = Supervisor {
                    registry: Arc::clone(&self.inner.registry),
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
        &self,
        key: &SlotKey,
        slot: &Arc<Slot>,
    ) -> Result<ActorCell, NoActor> {
        if let Some(cell) = slot.actor.get() {
            return Ok(cell.clone());
        }
        let runtime = self.clone();
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
                    runtime.spawn_actor::<A>(&key, slot_ref).await
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
    ) -> Result<ActorCell, NoActor> {
        if slot.is_closed() {
            // The spawn this caller waited for failed: its error, not
            // another replay. Closed for any other reason: look again.
            return Err(slot.failure.get().map_or(NoActor::Retry, |failure| {
                NoActor::Failed((**failure).clone())
            }));
        }
        // Not cached: the slot stays open, and the next caller tries the
        // supervisor's spawn again.
        let supervisor = self
            .supervisor()
            .await
            .map_err(|e| NoActor::Failed(SpawnFailure::Other(e)))?;
        let actor = AggregateActor::<A> {
            store: Arc::clone(&self.inner.store),
            config: Arc::clone(&self.inner.config),
            registry: Arc::clone(&self.inner.registry),
            key: key.clone(),
            slot: Arc::clone(slot),
            aggregate: PhantomData,
            unregister: actor::Unregister {
                registry: Arc::clone(&self.inner.registry),
                id: std::sync::OnceLock::new(),
            },
        };
        match Actor::spawn_linked(None, actor, (), supervisor).await {
            Ok((actor, _)) => {
                self.inner
                    .registry
                    .evict_if_over(self.inner.config.max_live_aggregates);
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
                self.inner.registry.remove(key, slot);
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
    runtime: Runtime,
    aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for Aggregates<A> {
    fn clone(&self) -> Self {
        Self {
            runtime: self.runtime.clone(),
            aggregate: PhantomData,
        }
    }
}

impl<A> fmt::Debug for Aggregates<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aggregates")
            .field("aggregate", &std::any::type_name::<A>())
            .finish_non_exhaustive()
    }
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

    /// Runs `command` on aggregate `id`, storing `context`'s ids on its
    /// events.
    ///
    /// Returns once the events are committed (durable as the store defines).
    /// Commands to one aggregate run one at a time, in the order they
    /// arrive; on a conflict with another writer, or when it stores nothing
    /// but was decided on a state the stream has moved past, the command is
    /// decided again on the caught-up state, up to the configured retries.
    ///
    /// # Errors
    /// [`CommandError::Domain`] when the aggregate refused it; the other
    /// variants for the infrastructure: conflict after retries, overload
    /// (answered at once), timeout, a panic in the aggregate, the store, the
    /// codec, an invalid id, a shut-down runtime. See [`CommandError`] for
    /// which of them may have stored something.
    #[instrument(name = "command", skip_all,
        fields(stream = %format_args!("{}-{id}", A::CATEGORY), version = field::Empty))]
    pub async fn execute_with(
        &self,
        id: &str,
        command: A::Command,
        context: CommandContext,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        let key = Self::key(id)?;
        let stream = key.stream.clone();
        let config = &self.runtime.inner.config;
        let deadline = deadline_after(config.command_timeout);
        let timeout = || CommandError::Timeout {
            stream: stream.clone(),
            after: config.command_timeout,
        };
        let mut command = command;
        loop {
            let (slot, permit, cell) = match self.reach(&key, deadline).await {
                Ok(reached) => reached,
                Err(Unreachable::ShutDown) => return Err(CommandError::ShutDown),
                Err(Unreachable::Overloaded) => {
                    return Err(CommandError::Overloaded {
                        stream,
                        pending: config.max_pending_commands,
                    })
                }
                Err(Unreachable::Timeout) => return Err(timeout()),
                Err(Unreachable::Load(error)) => return Err(error.into_command_error(&stream)),
                Err(Unreachable::Other(message)) => {
                    return Err(CommandError::AggregatePanicked { stream, message })
                }
            };
            let (sender, answer) = oneshot::channel();
            let message = AggregateMessage::<A>::Execute {
                command,
                context,
                deadline,
                span: Span::current(),
                reply: sender.into(),
            };
            match cell.send_message(message) {
                Ok(()) => permit.hand_over(),
                Err(MessagingErr::SendErr(AggregateMessage::Execute { command: back, .. })) => {
                    // The actor stopped without closing its slot (it failed):
                    // the command never reached it, so send it to a new one.
                    slot.close();
                    self.runtime.inner.registry.remove(&key, &slot);
                    command = back;
                    continue;
                }
                Err(error) => {
                    return Err(CommandError::AggregatePanicked {
                        stream,
                        message: format!("cannot reach the aggregate's actor: {error:?}"),
                    })
                }
            }
            match timeout_at(deadline, answer).await {
                Err(_) => return Err(timeout()),
                Ok(Ok(ExecuteReply::Done(result))) => return result,
                Ok(Ok(ExecuteReply::Bounced(back))) => command = back,
                Ok(Err(_)) => {
                    return Err(if self.runtime.inner.registry.is_shut_down() {
                        CommandError::ShutDown
                    } else {
                        CommandError::AggregatePanicked {
                            stream,
                            message: "the aggregate's actor stopped before answering".to_owned(),
                        }
                    })
                }
            }
        }
    }

    /// The current state of aggregate `id` (the default state if it has no
    /// events): after every command that arrived before this call, and
    /// after every event in the store when it is read (the actor catches up
    /// with other writers first).
    ///
    /// # Errors
    /// As for a command: overload, timeout, a panic while recovering, the
    /// store, the codec, an invalid id, a shut-down runtime.
    pub async fn state(&self, id: &str) -> Result<A, QueryError> {
        let key = Self::key(id)?;
        let stream = key.stream.clone();
        let config = &self.runtime.inner.config;
        let deadline = deadline_after(config.command_timeout);
        let timeout = || QueryError::Timeout {
            stream: stream.clone(),
            after: config.command_timeout,
        };
        loop {
            let (slot, permit, cell) = match self.reach(&key, deadline).await {
                Ok(reached) => reached,
                Err(Unreachable::ShutDown) => return Err(QueryError::ShutDown),
                Err(Unreachable::Overloaded) => {
                    return Err(QueryError::Overloaded {
                        stream,
                        pending: config.max_pending_commands,
                    })
                }
                Err(Unreachable::Timeout) => return Err(timeout()),
                Err(Unreachable::Load(error)) => return Err(error.into_query_error(&stream)),
                Err(Unreachable::Other(message)) => {
                    return Err(QueryError::AggregatePanicked { stream, message })
                }
            };
            let (sender, answer) = oneshot::channel();
            let message = AggregateMessage::<A>::State {
                deadline,
                reply: sender.into(),
            };
            if cell.send_message(message).is_err() {
                slot.close();
                self.runtime.inner.registry.remove(&key, &slot);
                continue;
            }
            permit.hand_over();
            match timeout_at(deadline, answer).await {
                Err(_) => return Err(timeout()),
                Ok(Ok(StateReply::Done(result))) => return result,
                Ok(Ok(StateReply::Bounced)) => {}
                Ok(Err(_)) if self.runtime.inner.registry.is_shut_down() => {
                    return Err(QueryError::ShutDown)
                }
                Ok(Err(_)) => {
                    return Err(QueryError::AggregatePanicked {
                        stream,
                        message: "the aggregate's actor stopped before answering".to_owned(),
                    })
                }
            }
        }
    }

    /// The state of aggregate `id` as of `version` (time travel), rebuilt
    /// from the store: the latest snapshot at or below `version` if any, then
    /// the events up to it. Read-only: the live actor is neither consulted
    /// nor disturbed. Version 0 gives the default state.
    ///
    /// # Errors
    /// [`QueryError::VersionNotFound`] when the stream has not reached
    /// `version`; the store's and codec's errors; a panic in `apply`.
    pub async fn state_at(&self, id: &str, version: Version) -> Result<A, QueryError> {
        let stream = Self::stream_id(id)?;
        let store = &self.runtime.inner.store;
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
            self.runtime
                .inner
                .registry
                .get_open(&key)
                .is_some_and(|slot| slot.actor.initialized())
        })
    }

    /// Takes a pending place on the stream's actor, spawning (and
    /// recovering) it if needed, before `deadline`. Shared by commands and
    /// state queries, which differ only in what they send.
    async fn reach(
        &self,
        key: &SlotKey,
        deadline: Instant,
    ) -> Result<(Arc<Slot>, registry::Permit, ActorCell), Unreachable> {
        let registry = &self.runtime.inner.registry;
        loop {
            let slot = registry.slot(key).ok_or(Unreachable::ShutDown)?;
            let permit = match slot.try_acquire(self.runtime.inner.config.max_pending_commands) {
                Ok(permit) => permit,
                // The actor is stopping; the next lookup finds or makes a
                // new slot.
                Err(Refused::Closed) => continue,
                Err(Refused::Overloaded) => return Err(Unreachable::Overloaded),
            };
            match timeout_at(deadline, self.runtime.actor_for::<A>(key, &slot)).await {
                Err(_) => return Err(Unreachable::Timeout),
                Ok(Ok(cell)) => return Ok((slot, permit, cell)),
                // The slot closed meanwhile; the place is given back on drop.
                Ok(Err(NoActor::Retry)) => continue,
                Ok(Err(NoActor::Failed(SpawnFailure::Load(error)))) => {
                    return Err(Unreachable::Load(error))
                }
                Ok(Err(NoActor::Failed(SpawnFailure::Other(message)))) => {
                    return Err(Unreachable::Other(message))
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

/// Why [`Aggregates::reach`] found no actor to take a request.
#[derive(Debug)]
enum Unreachable {
    ShutDown,
    Overloaded,
    Timeout,
    Load(LoadError),
    Other(String),
}
