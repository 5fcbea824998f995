//! [`AggregateActor`]: the ractor actor that hosts one aggregate stream. It
//! recovers in `pre_start` (latest snapshot, then the events after it), runs
//! that stream's commands one at a time (decide, try the events on a copy,
//! append with the expected version, catch up and retry on a conflict),
//! snapshots every N events in the background, and stops when the
//! registry's sweep passivates it, leaving its state idle in the registry
//! (a [`WarmState`]) for the next actor of the stream to start from.
//! Panics in the user's code become errors for the caller and retire the
//! actor; the next command gets a fresh one that reloads from the store.

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument, Span};

use crate::aggregate::Aggregate;
use crate::codec::{decode_event, decode_value, encode_event, encode_value};
use crate::error::{panic_message, AppendError, CodecError, CommandError, QueryError, ReadError};
use crate::event::{ExpectedVersion, Metadata, ReadDirection, Snapshot, StreamId, Version};
use crate::runtime::command_id::{
    command_fingerprint, derived_event_id, COMMAND_FINGERPRINT_KEY, COMMAND_ID_KEY,
};
use crate::runtime::config::TypeSettings;
use crate::runtime::registry::{Registry, Slot, SlotKey, WarmState as Parked};
use crate::runtime::{CommandContext, Executed, RuntimeConfig};
use crate::store::EventStore;

/// Events read per page while replaying a stream.
const REPLAY_PAGE: usize = 1024;

/// What callers and timers send to an [`AggregateActor`].
pub(crate) enum AggregateMessage<A: Aggregate> {
    /// Run a command.
    Execute(ExecuteRequest<A>, ReplyPort<A, ExecuteRequest<A>>),
    /// A copy of the current state and its version.
    State(StateRequest, ReplyPort<A, StateRequest>),
}

/// Where the actor answers request `R`.
pub(crate) type ReplyPort<A, R> = RpcReplyPort<Reply<<R as Request<A>>::Answer, R>>;

/// A command and what travels with it. `deadline` is the caller's: past it
/// nobody waits for the answer, so a command that has not started by then
/// is dropped.
pub(crate) struct ExecuteRequest<A: Aggregate> {
    pub(crate) command: A::Command,
    pub(crate) context: CommandContext,
    pub(crate) deadline: Instant,
    pub(crate) span: Span,
}

/// A state query.
pub(crate) struct StateRequest {
    pub(crate) deadline: Instant,
}

/// An actor's answer to a request.
pub(crate) enum Reply<T, R> {
    Done(T),
    /// The actor was retired before running the request: send it again (to
    /// the actor that replaces it).
    Bounced(R),
}

/// A request that callers send to an actor and that comes back to them
/// when the actor could not take it, so that one loop serves them all.
pub(crate) trait Request<A: Aggregate>: Sized + Send + 'static {
    /// What the actor answers.
    type Answer: Send + 'static;

    fn into_message(self, reply: ReplyPort<A, Self>) -> AggregateMessage<A>;

    /// The request back from a message the actor never received.
    fn from_message(message: AggregateMessage<A>) -> Option<Self>;
}

impl<A: Aggregate> Request<A> for ExecuteRequest<A> {
    type Answer = Result<Executed<A>, CommandError<A::Error>>;

    fn into_message(self, reply: ReplyPort<A, Self>) -> AggregateMessage<A> {
        AggregateMessage::Execute(self, reply)
    }

    fn from_message(message: AggregateMessage<A>) -> Option<Self> {
        match message {
            AggregateMessage::Execute(request, _) => Some(request),
            _ => None,
        }
    }
}

impl<A: Aggregate> Request<A> for StateRequest {
    type Answer = Result<(A, Version), QueryError>;

    fn into_message(self, reply: ReplyPort<A, Self>) -> AggregateMessage<A> {
        AggregateMessage::State(self, reply)
    }

    fn from_message(message: AggregateMessage<A>) -> Option<Self> {
        match message {
            AggregateMessage::State(request, _) => Some(request),
            _ => None,
        }
    }
}

/// The actor of one stream. Holds configuration only; the aggregate lives in
/// [`ActorState`].
pub(crate) struct AggregateActor<A> {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) config: Arc<RuntimeConfig>,
    /// This aggregate type's snapshot interval and idle timeout.
    pub(crate) settings: TypeSettings,
    pub(crate) registry: Arc<Registry>,
    pub(crate) key: SlotKey,
    pub(crate) slot: Arc<Slot>,
    pub(crate) aggregate: PhantomData<fn() -> A>,
    /// The type's metric handles; counts this actor as live once recovered.
    pub(crate) metrics: crate::metrics::ActorMetrics,
    /// Declared last so that it drops last, after the store handle.
    pub(crate) unregister: Unregister,
}

/// Removes an actor from the registry when its handler is dropped, which
/// ractor does at the very end of the actor's task. The runtime's shutdown
/// waits for that, so that once it returns no actor holds the store (and
/// the sled directory can be opened again).
pub(crate) struct Unregister {
    pub(crate) registry: Arc<Registry>,
    pub(crate) id: std::sync::OnceLock<ractor::ActorId>,
    /// Dropped after the registry hears of it: the runtime's shutdown
    /// waits for every clone to go (mini-redis's `shutdown_complete`), so
    /// it waits without polling.
    pub(crate) _alive: tokio::sync::mpsc::Sender<()>,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        if let Some(id) = self.id.get() {
            self.registry.actor_dropped(*id);
        }
    }
}

/// What a passivated actor leaves in the registry, and the next actor of
/// the stream starts from without reading the store. It carries its
/// version: if another writer (another process) appended meanwhile, the
/// first append with that expected version conflicts and the actor
/// catches up, as a live actor would.
pub(crate) struct WarmState<A> {
    aggregate: A,
    version: Version,
    snapshot_version: Version,
}

/// The mutable side of an [`AggregateActor`].
pub(crate) struct ActorState<A> {
    aggregate: A,
    version: Version,
    /// The version of the last snapshot saved or being saved.
    snapshot_version: Version,
    snapshot_task: Option<JoinHandle<()>>,
    /// Set after a panic: the state is suspect, the slot is closed, and the
    /// commands still queued are bounced to the replacement actor.
    retiring: bool,
}

/// Why an aggregate could not be rebuilt from the store.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum LoadError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("the aggregate panicked in apply: {0}")]
    Panicked(String),
}

impl LoadError {
    pub(crate) fn into_command_error<E: std::error::Error>(
        self,
        stream: &StreamId,
    ) -> CommandError<E> {
        match self {
            LoadError::Read(ReadError::Store(e)) => CommandError::Store(e),
            LoadError::Read(ReadError::InvalidInput(e)) => CommandError::InvalidInput(e),
            LoadError::Codec(e) => CommandError::Codec(e),
            LoadError::Panicked(message) => CommandError::AggregatePanicked {
                stream: stream.clone(),
                message,
            },
        }
    }

    pub(crate) fn into_query_error(self, stream: &StreamId) -> QueryError {
        match self {
            LoadError::Read(ReadError::Store(e)) => QueryError::Store(e),
            LoadError::Read(ReadError::InvalidInput(e)) => QueryError::InvalidInput(e),
            LoadError::Codec(e) => QueryError::Codec(e),
            LoadError::Panicked(message) => QueryError::AggregatePanicked {
                stream: stream.clone(),
                message,
            },
        }
    }
}

/// An aggregate rebuilt from the store.
pub(crate) struct Rebuilt<A> {
    pub(crate) aggregate: A,
    pub(crate) version: Version,
    pub(crate) snapshot_version: Version,
}

/// Rebuilds `stream` up to version `up_to` (the whole stream when `None`):
/// the latest snapshot at or below it if it decodes, then the events after.
///
/// A snapshot that does not decode (the state type changed) or that is
/// ahead of the stream (it belongs to another store) is ignored with a
/// warning: snapshots are only a cache.
pub(crate) async fn rebuild<A: Aggregate>(
    store: &dyn EventStore,
    stream: &StreamId,
    up_to: Option<Version>,
) -> Result<Rebuilt<A>, LoadError> {
    let current = store.stream_version(stream).await?;
    let target = up_to.unwrap_or(current).min(current);
    let mut aggregate = A::default();
    let mut version = Version::NONE;
    match store.load_snapshot(stream).await? {
        Some(snapshot) if snapshot.version > current => {
            warn!(%stream, snapshot = %snapshot.version, %current,
                "snapshot is ahead of the stream; ignoring it");
        }
        Some(snapshot) if snapshot.version <= target && snapshot.version > Version::NONE => {
            match decode_value::<A>(&snapshot.payload) {
                Ok(state) => {
                    aggregate = state;
                    version = snapshot.version;
                }
                Err(error) => warn!(%stream, snapshot = %snapshot.version, %error,
                    "snapshot does not decode; rebuilding from events"),
            }
        }
        _ => {}
    }
    let snapshot_version = version;
    let mut replayed = 0usize;
    while version < target {
        let limit =
            usize::try_from(target.0 - version.0).map_or(REPLAY_PAGE, |n| n.min(REPLAY_PAGE));
        let events = store
            .read_stream(stream, version.next(), ReadDirection::Forward, limit)
            .await?;
        if events.is_empty() {
            break;
        }
        for recorded in &events {
            let event = decode_event::<A::Event>(recorded)?;
            apply_guarded(&mut aggregate, &event).map_err(LoadError::Panicked)?;
            version = recorded.version;
            replayed += 1;
        }
    }
    debug!(%stream, %version, snapshot = %snapshot_version, replayed, "aggregate rebuilt");
    Ok(Rebuilt {
        aggregate,
        version,
        snapshot_version,
    })
}

/// Applies one event, turning a panic into its message.
fn apply_guarded<A: Aggregate>(aggregate: &mut A, event: &A::Event) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| aggregate.apply(event)))
        .map_err(|panic| panic_message(&*panic))
}

impl<A: Aggregate> Actor for AggregateActor<A> {
    type Msg = AggregateMessage<A>;
    type State = ActorState<A>;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (): (),
    ) -> Result<Self::State, ActorProcessingErr> {
        let warm = self
            .slot
            .take_warm()
            .and_then(|parked| parked.downcast::<WarmState<A>>().ok());
        let rebuilt = match warm {
            // Idle in the registry: no store read.
            Some(warm) => Rebuilt {
                aggregate: warm.aggregate,
                version: warm.version,
                snapshot_version: warm.snapshot_version,
            },
            // Boxed: the recovery's future is large and only lives here.
            None => {
                let started = std::time::Instant::now();
                let rebuilt = Box::pin(rebuild::<A>(&*self.store, &self.key.stream, None)).await?;
                let replayed = rebuilt.version.0 - rebuilt.snapshot_version.0;
                self.metrics.recovered(replayed, started.elapsed());
                rebuilt
            }
        };
        // Registered only once recovery succeeded: a failed start is not an
        // actor the supervisor will hear of.
        self.registry.actor_started(
            myself.get_id(),
            self.key.clone(),
            Arc::clone(&self.slot),
            self.settings.idle_timeout,
        );
        let _ = self.unregister.id.set(myself.get_id());
        self.metrics.started();
        self.slot
            .version
            .store(rebuilt.version.0, std::sync::atomic::Ordering::Release);
        debug!(stream = %self.key.stream, version = %rebuilt.version,
            snapshot = %rebuilt.snapshot_version, "aggregate started");
        Ok(ActorState {
            aggregate: rebuilt.aggregate,
            version: rebuilt.version,
            snapshot_version: rebuilt.snapshot_version,
            snapshot_task: None,
            retiring: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A long replay is worth a snapshot even before the next command.
        self.maybe_snapshot(state);
        self.stop_if_done(&myself);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Finish the snapshot in flight, so that after a shutdown the store
        // holds it (it is flushed with the store).
        if let Some(task) = state.snapshot_task.take() {
            let _ = task.await;
        }
        if state.retiring {
            // After a panic the state is suspect: the next actor reloads.
            self.registry.remove(&self.key, &self.slot);
        } else {
            if !self.registry.is_shut_down() {
                // Neither retired after a panic nor stopped by shutdown: idle.
                self.metrics.passivated();
            }
            // Passivated (or shutting down, where the registry drops it):
            // the state stays warm for the stream's next command.
            let warm: Parked = Box::new(WarmState {
                aggregate: std::mem::take(&mut state.aggregate),
                version: state.version,
                snapshot_version: state.snapshot_version,
            });
            self.registry.park(&self.key, &self.slot, warm);
        }
        debug!(stream = %self.key.stream, version = %state.version, "aggregate actor stopped");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AggregateMessage::Execute(request, reply) => {
                let answer = if state.retiring {
                    Reply::Bounced(request)
                } else if Instant::now() >= request.deadline {
                    // The caller has given up; running it now would commit a
                    // command whose caller was told "timeout".
                    debug!(parent: &request.span, stream = %self.key.stream, "command dropped unrun: past its deadline");
                    Reply::Done(Err(CommandError::Timeout {
                        stream: self.key.stream.clone(),
                        after: self.config.command_timeout(),
                    }))
                } else {
                    let ExecuteRequest {
                        command,
                        context,
                        span,
                        ..
                    } = request;
                    // Boxed: ractor keeps the future of `handle` allocated
                    // while the actor waits for its next message, sized for
                    // the largest path through it. Inline, the command's
                    // path made every idle actor carry it (~900 bytes).
                    let result = Box::pin(
                        self.execute(&myself, state, command, context)
                            .instrument(span),
                    )
                    .await;
                    Reply::Done(result)
                };
                // Released before replying, so that a caller that got its
                // answer never finds its own command still counted.
                self.registry.touch(&self.slot);
                self.slot.release();
                let _ = reply.send(answer);
            }
            AggregateMessage::State(request, reply) => {
                let answer = if state.retiring {
                    Reply::Bounced(request)
                } else if Instant::now() >= request.deadline {
                    Reply::Done(Err(QueryError::Timeout {
                        stream: self.key.stream.clone(),
                        after: self.config.command_timeout(),
                    }))
                } else {
                    // Another writer (another process) may have appended
                    // since our last command: the state answered is the
                    // stream's, not just this actor's view of it.
                    // Boxed for the same reason as `execute` above.
                    match Box::pin(self.catch_up(&myself, state)).await {
                        Ok(()) => Reply::Done(Ok((state.aggregate.clone(), state.version))),
                        Err(error) => Reply::Done(Err(error.into_query_error(&self.key.stream))),
                    }
                };
                self.registry.touch(&self.slot);
                self.slot.release();
                let _ = reply.send(answer);
            }
        }
        self.stop_if_done(&myself);
        Ok(())
    }
}

impl<A: Aggregate> AggregateActor<A> {
    /// Runs one command: decide, check, append, and on a conflict catch up
    /// and decide again (unless the caller gave the version it expects:
    /// then a moved stream is [`CommandError::WrongExpectedVersion`], with
    /// no retry).
    async fn execute(
        &self,
        myself: &ActorRef<AggregateMessage<A>>,
        state: &mut ActorState<A>,
        command: A::Command,
        context: CommandContext,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        // `command` is owned (not borrowed from the message) so that the
        // future holding it across the append needs `Command: Send` only.
        let stream = &self.key.stream;
        let moved = |actual: Version| CommandError::WrongExpectedVersion {
            stream: stream.clone(),
            expected: context.expected_version.unwrap_or(Version::NONE),
            actual,
        };
        // With a command id, a command that already ran answers with its
        // stored outcome, whatever the stream's version now.
        let fingerprint = context.command_id.map(|_| command_fingerprint(&command));
        let once = context.command_id.zip(fingerprint.as_deref());
        if let Some((id, fingerprint)) = once {
            if let Some(done) = self
                .already_ran(myself, state, id, fingerprint, context.return_state)
                .await?
            {
                return Ok(done);
            }
        }
        if let Some(expected) = context.expected_version {
            // The actor may be behind another writer: it only knows the
            // stream has moved past `expected` once it has caught up.
            if state.version < expected {
                self.catch_up(myself, state)
                    .await
                    .map_err(|e| e.into_command_error(stream))?;
            }
            if state.version != expected {
                return Err(moved(state.version));
            }
        }
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            if let Some((id, fingerprint)) = once.filter(|_| attempts > 1) {
                // The conflict may have been this very command, run by
                // another process (or an earlier attempt whose answer was lost).
                if let Some(done) = self
                    .already_ran(myself, state, id, fingerprint, context.return_state)
                    .await?
                {
                    return Ok(done);
                }
            }
            let decided = catch_unwind(AssertUnwindSafe(|| state.aggregate.handle(&command)));
            let events = match decided {
                Ok(Ok(events)) if !events.is_empty() => events,
                Ok(outcome) => {
                    // A refusal, or a decision with nothing to do, stores
                    // nothing, so no conflict would reveal that another
                    // writer moved the stream on: check before answering
                    // (one cheap read, on these outcomes only).
                    let current = self
                        .store
                        .stream_version(stream)
                        .await
                        .map_err(|e| LoadError::Read(e).into_command_error(stream))?;
                    if current > state.version && context.expected_version.is_some() {
                        return Err(moved(current));
                    }
                    if current > state.version && attempts <= self.config.max_conflict_retries() {
                        debug!(%stream, known = %state.version, %current,
                            "decided on a stale state: catching up and deciding again");
                        self.metrics.retried_on_stale_state();
                        self.catch_up(myself, state)
                            .await
                            .map_err(|e| e.into_command_error(stream))?;
                        continue;
                    }
                    return match outcome {
                        Ok(events) => Ok(Executed {
                            events,
                            version: state.version,
                            position: None,
                            state: context.return_state.then(|| state.aggregate.clone()),
                        }),
                        Err(refusal) => {
                            debug!(%stream, error = %refusal, "command refused by the domain");
                            Err(CommandError::Domain(refusal))
                        }
                    };
                }
                Err(panic) => return Err(self.retire(myself, state, "handle", panic)),
            };
            // The events are applied to a copy first: an event that makes
            // `apply` panic is never stored, since it would make the stream
            // unloadable forever; and a failed append leaves the state as is.
            let mut next = state.aggregate.clone();
            for event in &events {
                if let Err(message) = apply_guarded(&mut next, event) {
                    return Err(self.retire(myself, state, "apply", Box::new(message)));
                }
            }
            let mut metadata = Metadata {
                correlation_id: context.correlation_id,
                causation_id: context.causation_id,
                extra: context.metadata.clone(),
            };
            if let Some((id, fingerprint)) = once {
                metadata
                    .extra
                    .insert(COMMAND_ID_KEY.to_owned(), id.to_string());
                metadata
                    .extra
                    .insert(COMMAND_FINGERPRINT_KEY.to_owned(), fingerprint.to_owned());
            }
            let encoded = events
                .iter()
                .zip(0u32..)
                .map(|(event, index)| {
                    let encoded = encode_event(event)?.with_metadata(metadata.clone());
                    Ok(match once {
                        Some((id, _)) => encoded.with_id(derived_event_id(id, stream, index)),
                        None => encoded,
                    })
                })
                .collect::<Result<Vec<_>, CodecError>>()?;
            let expected = ExpectedVersion::Exact(state.version);
            match self.store.append(stream, expected, encoded).await {
                Ok(appended)
                    if once.is_some() && appended.first_version != state.version.next() =>
                {
                    // The store answered a retry: these ids were stored by
                    // another run of this command (another process), whose
                    // events may differ from the ones decided here.
                    let (id, fingerprint) = once.unwrap_or_default();
                    self.catch_up(myself, state)
                        .await
                        .map_err(|e| e.into_command_error(stream))?;
                    return match self
                        .already_ran(myself, state, id, fingerprint, context.return_state)
                        .await?
                    {
                        Some(done) => Ok(done),
                        None => Err(CommandError::Append(AppendError::DuplicateEventId {
                            event_id: derived_event_id(id, stream, 0),
                            reason: "the store answered a retry the log does not show",
                        })),
                    };
                }
                Ok(appended) => {
                    self.metrics.append_succeeded();
                    state.aggregate = next;
                    state.version = appended.last_version;
                    self.slot
                        .version
                        .store(state.version.0, std::sync::atomic::Ordering::Release);
                    Span::current().record("version", appended.last_version.0);
                    self.maybe_snapshot(state);
                    return Ok(Executed {
                        events,
                        version: appended.last_version,
                        position: Some(appended.last_position),
                        state: context.return_state.then(|| state.aggregate.clone()),
                    });
                }
                Err(AppendError::WrongExpectedVersion { actual, .. }) => {
                    if context.expected_version.is_some() {
                        // The caller decided on what it saw; deciding again
                        // on another state is not what it asked for.
                        self.catch_up(myself, state)
                            .await
                            .map_err(|e| e.into_command_error(stream))?;
                        if let Some((id, fingerprint)) = once {
                            if let Some(done) = self
                                .already_ran(myself, state, id, fingerprint, context.return_state)
                                .await?
                            {
                                return Ok(done);
                            }
                        }
                        return Err(moved(actual));
                    }
                    if attempts > self.config.max_conflict_retries() {
                        warn!(%stream, attempts, %actual, "conflict: retries exhausted");
                        return Err(CommandError::Conflict {
                            stream: stream.clone(),
                            attempts,
                        });
                    }
                    debug!(%stream, expected = %state.version, %actual, attempts,
                        "conflict: catching up and deciding again");
                    self.metrics.retried_after_conflict();
                    self.catch_up(myself, state)
                        .await
                        .map_err(|e| e.into_command_error(stream))?;
                }
                Err(AppendError::DuplicateEventId { .. })
                    if once.is_some() && attempts <= self.config.max_conflict_retries() =>
                {
                    // Another run of this command (another process) stored a
                    // different number of events: look again at the top.
                    self.catch_up(myself, state)
                        .await
                        .map_err(|e| e.into_command_error(stream))?;
                }
                Err(AppendError::InvalidInput(e)) => return Err(CommandError::InvalidInput(e)),
                Err(AppendError::Store(e)) => {
                    self.metrics.append_failed(&e);
                    return Err(CommandError::Store(e));
                }
                Err(other) => return Err(CommandError::Append(other)),
            }
        }
    }

    /// The stored outcome of command `id` on this stream, if it ran: its
    /// events (those with the ids derived from `id`, in order), last
    /// version and position, and the current state if asked. `None` when
    /// its first event id is not stored.
    ///
    /// # Errors
    /// [`CommandError::CommandIdReused`] when the stored fingerprint is not
    /// `fingerprint`; the store's and codec's.
    async fn already_ran(
        &self,
        myself: &ActorRef<AggregateMessage<A>>,
        state: &mut ActorState<A>,
        id: uuid::Uuid,
        fingerprint: &str,
        return_state: bool,
    ) -> Result<Option<Executed<A>>, CommandError<A::Error>> {
        let stream = &self.key.stream;
        let read = |e: ReadError| -> CommandError<A::Error> {
            LoadError::Read(e).into_command_error(stream)
        };
        let Some(first) = self
            .store
            .read_event(derived_event_id(id, stream, 0))
            .await
            .map_err(read)?
        else {
            return Ok(None);
        };
        let stored = first.metadata.extra.get(COMMAND_FINGERPRINT_KEY);
        if &first.stream_id != stream || stored.map(String::as_str) != Some(fingerprint) {
            return Err(CommandError::CommandIdReused {
                stream: stream.clone(),
                command_id: id,
            });
        }
        let mut recorded = vec![first];
        'pages: loop {
            let from = recorded.last().map_or(Version::FIRST, |e| e.version.next());
            let page = self
                .store
                .read_stream(stream, from, ReadDirection::Forward, REPLAY_PAGE)
                .await
                .map_err(read)?;
            if page.is_empty() {
                break;
            }
            for event in page {
                let index = u32::try_from(recorded.len()).unwrap_or(u32::MAX);
                if event.event_id != derived_event_id(id, stream, index) {
                    break 'pages;
                }
                recorded.push(event);
            }
        }
        let events = recorded
            .iter()
            .map(decode_event::<A::Event>)
            .collect::<Result<Vec<_>, _>>()?;
        let last = recorded
            .last()
            .map_or((Version::NONE, None), |e| (e.version, Some(e.position)));
        if state.version < last.0 {
            // It ran in another process: this actor has not seen it yet.
            self.catch_up(myself, state)
                .await
                .map_err(|e| e.into_command_error(stream))?;
        }
        debug!(%stream, command_id = %id, version = %last.0, "command already ran: its stored outcome");
        Ok(Some(Executed {
            events,
            version: last.0,
            position: last.1,
            state: return_state.then(|| state.aggregate.clone()),
        }))
    }

    /// Applies the events another writer appended after our version. A
    /// panic in `apply` retires the actor (the state is suspect).
    async fn catch_up(
        &self,
        myself: &ActorRef<AggregateMessage<A>>,
        state: &mut ActorState<A>,
    ) -> Result<(), LoadError> {
        let stream = &self.key.stream;
        loop {
            let events = self
                .store
                .read_stream(
                    stream,
                    state.version.next(),
                    ReadDirection::Forward,
                    REPLAY_PAGE,
                )
                .await?;
            if events.is_empty() {
                return Ok(());
            }
            for recorded in &events {
                let event = decode_event::<A::Event>(recorded)?;
                if let Err(message) = apply_guarded(&mut state.aggregate, &event) {
                    let _ = self.retire(myself, state, "apply", Box::new(message.clone()));
                    return Err(LoadError::Panicked(message));
                }
                state.version = recorded.version;
            }
            self.slot
                .version
                .store(state.version.0, std::sync::atomic::Ordering::Release);
        }
    }

    /// After a panic: close the slot so that new commands go to a fresh actor
    /// (which reloads from the store), bounce the queued ones there, and stop
    /// once none is pending.
    fn retire(
        &self,
        myself: &ActorRef<AggregateMessage<A>>,
        state: &mut ActorState<A>,
        during: &str,
        panic: Box<dyn std::any::Any + Send>,
    ) -> CommandError<A::Error> {
        let message = panic_message(&*panic);
        warn!(stream = %self.key.stream, during, panic = %message,
            "the aggregate panicked; retiring its actor");
        state.retiring = true;
        self.metrics.panicked();
        self.slot.close();
        self.registry.remove(&self.key, &self.slot);
        self.stop_if_done(myself);
        CommandError::AggregatePanicked {
            stream: self.key.stream.clone(),
            message,
        }
    }

    /// A closed slot's actor stops once its last pending command is answered.
    fn stop_if_done(&self, myself: &ActorRef<AggregateMessage<A>>) {
        if self.slot.is_closed() && self.slot.pending() == 0 {
            myself.stop(None);
        }
    }

    /// Snapshots every `snapshot_every` events. The state is encoded here,
    /// at this version; the save runs in its own task so that the next
    /// command does not wait for it. One save at a time: a slow store skips
    /// snapshots rather than piling saves up (and an older save can never
    /// land after a newer one).
    fn maybe_snapshot(&self, state: &mut ActorState<A>) {
        let every = self.settings.snapshot_every;
        if every == 0 || state.version.0 - state.snapshot_version.0 < every {
            return;
        }
        if state
            .snapshot_task
            .as_ref()
            .is_some_and(|task| !task.is_finished())
        {
            return;
        }
        let stream = self.key.stream.clone();
        let version = state.version;
        state.snapshot_version = version;
        // Runs after the command's append succeeded: a panic in the state's
        // `Serialize` must not turn a committed command into a reported
        // failure, so it only costs this snapshot (a cache).
        let encoded = catch_unwind(AssertUnwindSafe(|| encode_value(&state.aggregate)))
            .unwrap_or_else(|_| {
                Err(crate::error::CodecError::Encode {
                    what: std::any::type_name::<A>().to_owned(),
                    message: "Serialize panicked".to_owned(),
                })
            });
        match encoded {
            Ok(payload) => {
                let store = Arc::clone(&self.store);
                let metrics = self.metrics.shared();
                state.snapshot_task = Some(tokio::spawn(async move {
                    match store
                        .save_snapshot(&stream, Snapshot { version, payload })
                        .await
                    {
                        Ok(()) => {
                            metrics.snapshot_saved();
                            debug!(%stream, %version, "snapshot saved");
                        }
                        Err(error) => {
                            metrics.snapshot_failed();
                            warn!(%stream, %version, %error, "snapshot not saved");
                        }
                    }
                }));
            }
            Err(error) => warn!(%stream, %version, %error, "state does not encode; no snapshot"),
        }
    }
}
