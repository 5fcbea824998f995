//! Runs a [`ProcessManager`]: follows the log from the checkpoint
//! `workflow:NAME`, records each decision in the instance's stream before
//! acting on it, sends the decided commands with ids derived from the
//! recorded step (so that each runs exactly once, whatever crashes in
//! between), fires durable timers, and applies the failure policy.
//! Instances run concurrently; one instance's inputs run in log order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};
use uuid::Uuid;

use super::process::{
    FailurePolicy, Input, OnFailure, ProcessManager, Reaction, Sent, StepRecord, StepStatus, WakeAt,
};
use crate::codec::{decode_value, encode_value};
use crate::error::{AppendError, InvalidInput, StoreError};
use crate::event::{
    EventFilter, ExpectedVersion, Metadata, NewEvent, Position, ReadDirection, RecordedEvent,
    StreamId, Version,
};
use crate::runtime::{derived_id, CommandContext};
use crate::store::EventStore;

/// The event type of a recorded step in an instance's stream.
pub const STEP_EVENT_TYPE: &str = "WorkflowStep";
/// The prefix of a workflow's checkpoint name: `workflow:NAME`.
pub const WORKFLOW_CHECKPOINT_PREFIX: &str = "workflow:";

/// Why a workflow call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowError {
    /// The workflow's name is not a valid stream category without `-`.
    #[error("workflow name {name:?} is invalid: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A workflow of this name already runs on this runtime.
    #[error("a workflow named {name:?} already runs on this runtime")]
    AlreadyRunning {
        /// The name.
        name: String,
    },
    /// No workflow of this name runs on this runtime.
    #[error("no workflow named {name:?} runs on this runtime")]
    Unknown {
        /// The name asked for.
        name: String,
    },
    /// The workflow did not reach the position in time.
    #[error("workflow {name:?} did not reach position {position} within {after:?}")]
    Timeout {
        /// The workflow.
        name: String,
        /// The position waited for.
        position: Position,
        /// How long it waited.
        after: Duration,
    },
    /// The workflow stopped (shut down, or its store closed).
    #[error("workflow {name:?} has stopped")]
    Stopped {
        /// The workflow.
        name: String,
    },
    /// The store failed while starting the workflow.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a workflow runs.
#[derive(Debug, Clone)]
pub struct WorkflowConfig {
    pub(crate) page_size: usize,
    pub(crate) policy: FailurePolicy,
    pub(crate) retry_backoff: Duration,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        Self {
            page_size: 512,
            policy: FailurePolicy::default(),
            retry_backoff: Duration::from_millis(50),
        }
    }
}

impl WorkflowConfig {
    /// Events read from the log per page (at least 1; default 512). The
    /// instances of one page run concurrently; the checkpoint moves after
    /// each page.
    pub fn page_size(mut self, events: usize) -> Self {
        self.page_size = events.max(1);
        self
    }

    /// What to do when a command keeps failing (default: retry forever
    /// with backoff from 10 ms to 5 s).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }
}

/// Whether a workflow runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkflowState {
    /// Following the log.
    Running,
    /// Shut down, or its store closed.
    Stopped,
}

/// A workflow's progress, from [`WorkflowHandle::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkflowStatus {
    /// The workflow's name.
    pub name: String,
    /// Running or stopped.
    pub state: WorkflowState,
    /// Every event up to here is handled and its commands sent (the
    /// checkpoint).
    pub position: Position,
    /// Instances still running.
    pub running: usize,
    /// Instances completed ([`Reaction::complete`]).
    pub completed: usize,
    /// Instances stopped by [`OnFailure::Stop`], with the last error.
    pub failed: Vec<(String, String)>,
    /// Timers set and not yet fired.
    pub pending_timers: usize,
}

/// A running workflow. Cloning is cheap; every clone controls the same
/// workflow. The runtime that started it ([`crate::Runtime::start_workflow`])
/// stops it first at its shutdown.
#[derive(Clone)]
pub struct WorkflowHandle {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    status: watch::Sender<WorkflowStatus>,
    stop: watch::Sender<bool>,
    /// The driver task, taken by the first shutdown.
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for WorkflowHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowHandle")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl WorkflowHandle {
    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The workflow's progress now.
    pub fn status(&self) -> WorkflowStatus {
        self.shared.status.borrow().clone()
    }

    /// Waits until every event up to `position` is handled (its decisions
    /// recorded and commands sent), for at most `timeout`.
    ///
    /// # Errors
    /// [`WorkflowError::Timeout`]; [`WorkflowError::Stopped`] when it
    /// stopped first.
    pub async fn wait_for(
        &self,
        position: Position,
        timeout: Duration,
    ) -> Result<WorkflowStatus, WorkflowError> {
        let mut status = self.shared.status.subscribe();
        let reached = tokio::time::timeout(timeout, async {
            loop {
                {
                    let now = status.borrow_and_update();
                    if now.position >= position {
                        return Ok(now.clone());
                    }
                    if now.state == WorkflowState::Stopped {
                        return Err(WorkflowError::Stopped {
                            name: self.shared.name.clone(),
                        });
                    }
                }
                if status.changed().await.is_err() {
                    return Err(WorkflowError::Stopped {
                        name: self.shared.name.clone(),
                    });
                }
            }
        })
        .await;
        reached.unwrap_or_else(|_| {
            Err(WorkflowError::Timeout {
                name: self.shared.name.clone(),
                position,
                after: timeout,
            })
        })
    }

    /// Stops the workflow: the page in hand finishes (its commands are
    /// sent and the checkpoint saved) unless a command is waiting for a
    /// retry, which is then left for the next start (it resends it, with
    /// the same command id). Calling it again is fine.
    pub async fn shutdown(&self) -> WorkflowStatus {
        let _ = self.shared.stop.send(true);
        if let Some(task) = self.shared.task.lock().await.take() {
            let _ = task.await;
        }
        self.status()
    }
}

/// Microseconds since the Unix epoch of a wall-clock time (0 before it).
fn micros_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The workflow's clock: the wall clock when it started plus tokio's time
/// since, so that timers follow tokio's paused clock in tests (and ignore
/// wall-clock steps while running).
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall: u64,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            wall: micros_of(SystemTime::now()),
            start: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.wall.saturating_add(elapsed)
    }

    fn instant_at(&self, micros: u64) -> Instant {
        self.start + Duration::from_micros(micros.saturating_sub(self.wall))
    }
}

/// One workflow instance in memory, as its stream records it.
struct Instance<C> {
    id: String,
    stream: StreamId,
    correlation: Uuid,
    version: Version,
    state: Vec<u8>,
    /// Every recorded step's commands, by step id: a step found here is
    /// not decided again, only its commands resent.
    steps: HashMap<Uuid, Vec<C>>,
    timers: BTreeMap<String, u64>,
    status: StepStatus,
    /// Recorded timer steps whose commands may not all have been sent:
    /// unlike an event, a fired timer is not read again from the log
    /// (its step removed it), so these are resent before anything else.
    resume: Vec<Uuid>,
}

impl<C: serde::de::DeserializeOwned> Instance<C> {
    fn new(name: &str, id: &str) -> Result<Self, InvalidInput> {
        Ok(Self {
            id: id.to_owned(),
            stream: StreamId::for_aggregate(name, id)?,
            correlation: derived_id(&[name.as_bytes(), b"instance", id.as_bytes()]),
            version: Version::NONE,
            state: Vec::new(),
            steps: HashMap::new(),
            timers: BTreeMap::new(),
            status: StepStatus::Running,
            resume: Vec::new(),
        })
    }

    /// Applies one recorded step.
    fn apply(
        &mut self,
        step: Uuid,
        version: Version,
        record: StepRecord,
    ) -> Result<(), StoreError> {
        let commands = record
            .commands
            .iter()
            .map(|bytes| decode_value::<C>(bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(format!("workflow step {step}: {e}")))?;
        self.steps.insert(step, commands);
        self.state = record.state;
        for name in &record.cancelled {
            self.timers.remove(name);
        }
        for (name, due) in record.timers {
            self.timers.insert(name, due);
        }
        if record.status != StepStatus::Running {
            self.timers.clear();
        }
        self.status = record.status;
        self.version = version;
        Ok(())
    }
}

/// An input owned by the runner, lent to [`ProcessManager::react`].
enum Owned<C> {
    Event(RecordedEvent),
    Refused { command: C, reason: String },
    Failed { command: C, error: String },
    Timer { name: String },
}

impl<C> Owned<C> {
    fn as_input(&self) -> Input<'_, C> {
        match self {
            Owned::Event(event) => Input::Event(event),
            Owned::Refused { command, reason } => Input::Refused { command, reason },
            Owned::Failed { command, error } => Input::Failed { command, error },
            Owned::Timer { name } => Input::Timer { name },
        }
    }
}

/// Why a step did not finish.
#[derive(Debug)]
enum Interrupted {
    Store(StoreError),
    Stopping,
}

impl From<StoreError> for Interrupted {
    fn from(error: StoreError) -> Self {
        Interrupted::Store(error)
    }
}

/// What the runner's tasks share.
struct Context<P> {
    manager: P,
    store: Arc<dyn EventStore>,
    config: WorkflowConfig,
    clock: Clock,
    stop: watch::Receiver<bool>,
    metrics: crate::metrics::ProcessMetrics,
}

type Step<'a> = Pin<Box<dyn std::future::Future<Output = Result<(), Interrupted>> + Send + 'a>>;

impl<P: ProcessManager> Context<P> {
    /// Runs one input of `instance`: the recorded step if there is one,
    /// else a new decision, recorded; then its commands.
    fn run<'a>(
        &'a self,
        instance: &'a mut Instance<P::Command>,
        step: Uuid,
        causation: Uuid,
        input: Owned<P::Command>,
    ) -> Step<'a> {
        Box::pin(async move {
            let commands = match instance.steps.get(&step) {
                Some(commands) => commands.clone(),
                None => {
                    if instance.status != StepStatus::Running {
                        return Ok(());
                    }
                    let state = self.state_of(instance)?;
                    let reaction = self.manager.react(&state, &input.as_input());
                    let fired = match &input {
                        Owned::Timer { name } => Some(name.clone()),
                        _ => None,
                    };
                    let commands = reaction.commands.clone();
                    self.record(instance, step, causation, reaction, fired)
                        .await?;
                    commands
                }
            };
            self.dispatch(instance, step, causation, commands).await
        })
    }

    fn state_of(&self, instance: &Instance<P::Command>) -> Result<P::State, StoreError> {
        if instance.state.is_empty() {
            return Ok(P::State::default());
        }
        decode_value(&instance.state)
            .map_err(|e| StoreError::Corrupt(format!("workflow {} state: {e}", instance.stream)))
    }

    /// Appends the step to the instance's stream (its id is the step id,
    /// so a step recorded before a crash is not recorded twice) and
    /// applies it.
    async fn record(
        &self,
        instance: &mut Instance<P::Command>,
        step: Uuid,
        causation: Uuid,
        reaction: Reaction<P::State, P::Command>,
        fired: Option<String>,
    ) -> Result<(), StoreError> {
        let now = self.clock.now();
        let encode = |e: crate::error::CodecError| StoreError::Corrupt(e.to_string());
        let record = StepRecord {
            state: encode_value(&reaction.state).map_err(encode)?,
            commands: reaction
                .commands
                .iter()
                .map(encode_value)
                .collect::<Result<_, _>>()
                .map_err(encode)?,
            timers: reaction
                .timers
                .iter()
                .map(|(name, at)| {
                    let due = match at {
                        WakeAt::Time(time) => micros_of(*time),
                        WakeAt::After(after) => {
                            now.saturating_add(u64::try_from(after.as_micros()).unwrap_or(u64::MAX))
                        }
                    };
                    (name.clone(), due)
                })
                .collect(),
            cancelled: fired.into_iter().chain(reaction.cancelled).collect(),
            status: if reaction.complete {
                StepStatus::Completed
            } else {
                StepStatus::Running
            },
        };
        self.append(instance, step, causation, record).await
    }

    async fn append(
        &self,
        instance: &mut Instance<P::Command>,
        step: Uuid,
        causation: Uuid,
        record: StepRecord,
    ) -> Result<(), StoreError> {
        let payload = encode_value(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let event = NewEvent::new(STEP_EVENT_TYPE, payload)
            .with_id(step)
            .with_metadata(Metadata::new(Some(instance.correlation), Some(causation)));
        let expected = ExpectedVersion::Exact(instance.version);
        match self
            .store
            .append(&instance.stream, expected, vec![event])
            .await
        {
            Ok(appended) if appended.first_version == instance.version.next() => {
                instance.apply(step, appended.last_version, record)
            }
            // Recorded by an earlier run this instance has not loaded, or
            // another writer moved the stream: reload it from the log. If
            // the step is not there, it was decided on a stale state: the
            // page is run again, on the reloaded instance.
            Ok(_) | Err(AppendError::WrongExpectedVersion { .. }) => {
                let mut reloaded = load_instance::<P>(&*self.store, &instance.id).await?;
                // Known only in memory: the timer steps still to resend.
                reloaded.resume = std::mem::take(&mut instance.resume);
                *instance = reloaded;
                if instance.steps.contains_key(&step) {
                    Ok(())
                } else {
                    Err(StoreError::Corrupt(format!(
                        "workflow {} moved under its runner; reloaded, deciding again",
                        instance.stream
                    )))
                }
            }
            Err(AppendError::Store(error)) => Err(error),
            Err(other) => Err(StoreError::Corrupt(format!(
                "workflow step {step} refused: {other}"
            ))),
        }
    }

    /// Sends a step's commands in order, each with its derived command id;
    /// a refusal or a failure becomes the next input.
    async fn dispatch(
        &self,
        instance: &mut Instance<P::Command>,
        step: Uuid,
        causation: Uuid,
        commands: Vec<P::Command>,
    ) -> Result<(), Interrupted> {
        let name = P::NAME.as_bytes();
        for (index, command) in commands.into_iter().enumerate() {
            let index = (index as u64).to_be_bytes();
            let id = |kind: &[u8]| derived_id(&[name, kind, step.as_bytes(), &index]);
            let (refused, failed, stopped) = (id(b"refused"), id(b"failed"), id(b"stopped"));
            // An outcome recorded before a crash is not asked again: the
            // aggregate may answer otherwise now.
            for recorded in [refused, failed] {
                if instance.steps.contains_key(&recorded) {
                    let input = Owned::Timer {
                        name: String::new(),
                    };
                    self.run(instance, recorded, causation, input).await?;
                }
            }
            if instance.steps.contains_key(&refused) || instance.steps.contains_key(&failed) {
                continue;
            }
            if instance.steps.contains_key(&stopped) {
                return Ok(());
            }
            let context = CommandContext::new(instance.correlation, causation)
                .with_command_id(id(b"command"));
            let policy = self.config.policy;
            let mut backoff = policy.initial_backoff;
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let sent = self.manager.send(command.clone(), context.clone()).await;
                self.metrics.command(&sent);
                match sent {
                    Sent::Done => break,
                    Sent::Refused(reason) => {
                        debug!(workflow = P::NAME, instance = %instance.id, ?command, %reason, "command refused");
                        let input = Owned::Refused { command, reason };
                        self.run(instance, refused, causation, input).await?;
                        break;
                    }
                    Sent::Failed(error) if attempt < policy.attempts => {
                        warn!(workflow = P::NAME, instance = %instance.id, ?command, %error, attempt, "command failed; retrying");
                        if *self.stop.borrow() {
                            return Err(Interrupted::Stopping);
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(policy.max_backoff);
                    }
                    Sent::Failed(error) => match policy.then {
                        OnFailure::Compensate => {
                            let input = Owned::Failed { command, error };
                            self.run(instance, failed, causation, input).await?;
                            break;
                        }
                        _ => {
                            warn!(workflow = P::NAME, instance = %instance.id, ?command, %error, "command failed; instance stopped");
                            let record = StepRecord {
                                state: instance.state.clone(),
                                commands: Vec::new(),
                                timers: Vec::new(),
                                cancelled: Vec::new(),
                                status: StepStatus::Failed(error),
                            };
                            self.append(instance, stopped, causation, record).await?;
                            return Ok(());
                        }
                    },
                }
            }
        }
        Ok(())
    }
}

/// Loads instance `id` of workflow `P` from its stream.
async fn load_instance<P: ProcessManager>(
    store: &dyn EventStore,
    id: &str,
) -> Result<Instance<P::Command>, StoreError> {
    let mut instance =
        Instance::new(P::NAME, id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    loop {
        let page = store
            .read_stream(
                &instance.stream,
                instance.version.next(),
                ReadDirection::Forward,
                1024,
            )
            .await
            .map_err(read_error)?;
        if page.is_empty() {
            return Ok(instance);
        }
        for event in page {
            apply_event(&mut instance, &event)?;
        }
    }
}

fn apply_event<C: serde::de::DeserializeOwned>(
    instance: &mut Instance<C>,
    event: &RecordedEvent,
) -> Result<(), StoreError> {
    let record: StepRecord = decode_value(&event.payload)
        .map_err(|e| StoreError::Corrupt(format!("workflow step {}: {e}", event.event_id)))?;
    instance.apply(event.event_id, event.version, record)
}

/// Whether a recorded step answered a timer: its causation is itself
/// (an event's step is caused by the event, a refusal's by its step's
/// cause).
fn is_timer_step(event: &RecordedEvent) -> bool {
    event.metadata.causation_id == Some(event.event_id)
}

fn read_error(error: crate::error::ReadError) -> StoreError {
    match error {
        crate::error::ReadError::Store(error) => error,
        crate::error::ReadError::InvalidInput(error) => StoreError::InvalidInput(error),
    }
}

/// Checks a workflow's name: a valid category without `-`.
pub(crate) fn validate_workflow_name(name: &str) -> Result<(), WorkflowError> {
    let invalid = |reason: String| WorkflowError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.contains('-') {
        return Err(invalid(
            "it contains '-', the category separator".to_owned(),
        ));
    }
    StreamId::new(name).map_err(|e| invalid(e.to_string()))?;
    Ok(())
}

type Instances<C> = HashMap<String, Instance<C>>;

/// Starts the workflow's driver task: loads every instance from the
/// workflow's category (their states, recorded steps and pending timers)
/// and the checkpoint, then follows the log.
pub(crate) async fn start<P: ProcessManager>(
    manager: P,
    store: Arc<dyn EventStore>,
    config: WorkflowConfig,
) -> Result<WorkflowHandle, WorkflowError> {
    validate_workflow_name(P::NAME)?;
    let checkpoint = format!("{WORKFLOW_CHECKPOINT_PREFIX}{}", P::NAME);
    let position = store
        .load_checkpoint(&checkpoint)
        .await
        .map_err(read_error)?
        .unwrap_or(Position::START);
    let mut instances: Instances<P::Command> = HashMap::new();
    let filter = EventFilter::Category(P::NAME.to_owned());
    let mut from = Position(1);
    loop {
        let page = store
            .read_all(from, ReadDirection::Forward, 1024, &filter)
            .await
            .map_err(read_error)?;
        let Some(last) = page.last().map(|e| e.position) else {
            break;
        };
        for event in &page {
            let id = event
                .stream_id
                .as_str()
                .split_once('-')
                .map_or("", |(_, id)| id)
                .to_owned();
            if !instances.contains_key(&id) {
                let new =
                    Instance::new(P::NAME, &id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                instances.insert(id.clone(), new);
            }
            if let Some(instance) = instances.get_mut(&id) {
                apply_event(instance, event)?;
                // A timer step (its causation is itself) recorded after
                // the checkpoint may have been cut before its commands
                // were all sent: the driver sends them before reading on
                // (again, with the same command ids, for the ones sent).
                if event.position > position && is_timer_step(event) {
                    instance.resume.push(event.event_id);
                }
            }
        }
        from = last.next();
    }
    let (stop, stop_seen) = watch::channel(false);
    let status = WorkflowStatus {
        name: P::NAME.to_owned(),
        state: WorkflowState::Running,
        position,
        running: 0,
        completed: 0,
        failed: Vec::new(),
        pending_timers: 0,
    };
    let (status, _) = watch::channel(status);
    let shared = Arc::new(Shared {
        name: P::NAME.to_owned(),
        status,
        stop,
        task: tokio::sync::Mutex::new(None),
    });
    let context = Arc::new(Context {
        manager,
        store,
        config,
        clock: Clock::new(),
        stop: stop_seen,
        metrics: crate::metrics::ProcessMetrics::new(P::NAME),
    });
    let mut driver = Driver {
        context,
        shared: Arc::clone(&shared),
        checkpoint,
        position,
        instances,
        timers: BTreeSet::new(),
        resume: BTreeSet::new(),
    };
    for (id, instance) in &driver.instances {
        for (name, due) in &instance.timers {
            driver.timers.insert((*due, id.clone(), name.clone()));
        }
        if !instance.resume.is_empty() {
            driver.resume.insert(id.clone());
        }
    }
    // The status is right from the start: instances and pending timers.
    driver.publish(WorkflowState::Running);
    let task = tokio::spawn(driver.run());
    *shared.task.lock().await = Some(task);
    Ok(WorkflowHandle { shared })
}

/// The driver task's state.
struct Driver<P: ProcessManager> {
    context: Arc<Context<P>>,
    shared: Arc<Shared>,
    checkpoint: String,
    position: Position,
    instances: Instances<P::Command>,
    /// Pending timers: (due, instance, name).
    timers: BTreeSet<(u64, String, String)>,
    /// Instances with timer steps to resend ([`Instance::resume`]).
    resume: BTreeSet<String>,
}

/// One unit of work for an instance.
enum Work {
    Events(Vec<RecordedEvent>),
    Timers(Vec<(u64, String)>),
    /// Resend the commands of recorded timer steps ([`Instance::resume`]).
    Resume,
}

impl<P: ProcessManager> Driver<P> {
    async fn run(mut self) {
        let mut stop = self.context.stop.clone();
        let mut feed = self.context.store.subscribe_live();
        let backoff = self.context.config.retry_backoff;
        loop {
            if *stop.borrow() {
                break;
            }
            // Fired timers' steps not fully sent come before anything
            // else: the checkpoint must not pass them while they are
            // unsent, or a crash would lose their commands.
            if !self.resume.is_empty() {
                let work = self
                    .resume
                    .iter()
                    .map(|id| (id.clone(), Work::Resume))
                    .collect();
                if let Err(error) = self.process(work).await {
                    if matches!(error, Interrupted::Stopping) {
                        break;
                    }
                    warn!(
                        workflow = P::NAME,
                        ?error,
                        "timer steps not resent; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                }
                self.publish(WorkflowState::Running);
                continue;
            }
            // Due timers first: they are part of the instances' inputs.
            let now = self.context.clock.now();
            let due: Vec<_> = self
                .timers
                .iter()
                .take_while(|(at, _, _)| *at <= now)
                .cloned()
                .collect();
            if !due.is_empty() {
                let mut groups: HashMap<String, Vec<(u64, String)>> = HashMap::new();
                for (at, id, name) in due {
                    groups.entry(id).or_default().push((at, name));
                }
                let work = groups
                    .into_iter()
                    .map(|(id, t)| (id, Work::Timers(t)))
                    .collect();
                if let Err(error) = self.process(work).await {
                    if matches!(error, Interrupted::Stopping) {
                        break;
                    }
                    warn!(workflow = P::NAME, ?error, "timers not handled; retrying");
                    tokio::time::sleep(backoff).await;
                }
                self.publish(WorkflowState::Running);
                continue;
            }
            let page = self
                .context
                .store
                .read_all(
                    self.position.next(),
                    ReadDirection::Forward,
                    self.context.config.page_size,
                    &EventFilter::All,
                )
                .await;
            let page = match page {
                Ok(page) => page,
                Err(error) => {
                    warn!(workflow = P::NAME, %error, "cannot read the log; retrying");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let Some(last) = page.last().map(|e| e.position) else {
                let next = self
                    .timers
                    .first()
                    .map(|(at, _, _)| self.context.clock.instant_at(*at));
                tokio::select! {
                    _ = stop.changed() => {}
                    commit = feed.recv() => {
                        if matches!(commit, Err(crate::store::FeedError::Closed)) {
                            break;
                        }
                    }
                    () = sleep_until(next) => {}
                }
                continue;
            };
            let mut order: Vec<String> = Vec::new();
            let mut groups: HashMap<String, Vec<RecordedEvent>> = HashMap::new();
            for event in page {
                if event.stream_id.category() == P::NAME {
                    continue;
                }
                if let Some(id) = self.context.manager.instance_of(&event) {
                    if !groups.contains_key(&id) {
                        order.push(id.clone());
                    }
                    groups.entry(id).or_default().push(event);
                }
            }
            let work = order
                .into_iter()
                .filter_map(|id| groups.remove(&id).map(|events| (id, Work::Events(events))))
                .collect();
            match self.process(work).await {
                Ok(()) => {}
                Err(Interrupted::Stopping) => break,
                Err(Interrupted::Store(error)) => {
                    warn!(workflow = P::NAME, %error, "page not handled; retrying it");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            }
            if let Err(error) = self
                .context
                .store
                .save_checkpoint(&self.checkpoint, last)
                .await
            {
                warn!(workflow = P::NAME, %error, "checkpoint not saved");
            }
            self.position = last;
            self.publish(WorkflowState::Running);
        }
        self.publish(WorkflowState::Stopped);
    }

    /// Runs each instance's work in its own task, all concurrently, and
    /// takes the instances back. The first error is returned once every
    /// task is done (what finished is recorded and kept).
    async fn process(&mut self, work: Vec<(String, Work)>) -> Result<(), Interrupted> {
        let mut tasks = JoinSet::new();
        for (id, work) in work {
            let instance = match self.instances.remove(&id) {
                Some(instance) => instance,
                None => match Instance::new(P::NAME, &id) {
                    Ok(instance) => instance,
                    Err(error) => {
                        warn!(workflow = P::NAME, instance = %id, %error, "not a valid instance id; ignored");
                        continue;
                    }
                },
            };
            for (name, due) in &instance.timers {
                self.timers.remove(&(*due, id.clone(), name.clone()));
            }
            let context = Arc::clone(&self.context);
            tasks.spawn(async move {
                let mut instance = instance;
                let result = context.work(&mut instance, work).await;
                (instance, result)
            });
        }
        let mut result = Ok(());
        while let Some(joined) = tasks.join_next().await {
            let (instance, outcome) = match joined {
                Ok(done) => done,
                Err(error) => {
                    // A panic in the user's `react` or `send`: the instance
                    // reloads from its stream at the next attempt.
                    warn!(workflow = P::NAME, %error, "workflow task panicked");
                    result = Err(Interrupted::Store(StoreError::Corrupt(error.to_string())));
                    continue;
                }
            };
            for (name, due) in &instance.timers {
                self.timers
                    .insert((*due, instance.id.clone(), name.clone()));
            }
            if instance.resume.is_empty() {
                self.resume.remove(&instance.id);
            } else {
                self.resume.insert(instance.id.clone());
            }
            if result.is_ok() {
                result = outcome;
            }
            self.instances.insert(instance.id.clone(), instance);
        }
        result
    }

    fn publish(&self, state: WorkflowState) {
        let mut status = WorkflowStatus {
            name: P::NAME.to_owned(),
            state,
            position: self.position,
            running: 0,
            completed: 0,
            failed: Vec::new(),
            pending_timers: self.timers.len(),
        };
        for instance in self.instances.values() {
            match &instance.status {
                StepStatus::Running => status.running += 1,
                StepStatus::Completed => status.completed += 1,
                StepStatus::Failed(error) => {
                    status.failed.push((instance.id.clone(), error.clone()))
                }
            }
        }
        status.failed.sort();
        let metrics = &self.context.metrics;
        metrics.instances(status.running);
        metrics.timers_pending(status.pending_timers);
        self.shared.status.send_replace(status);
    }
}

impl<P: ProcessManager> Context<P> {
    async fn work(
        &self,
        instance: &mut Instance<P::Command>,
        work: Work,
    ) -> Result<(), Interrupted> {
        match work {
            Work::Events(events) => {
                for event in events {
                    let step =
                        derived_id(&[P::NAME.as_bytes(), b"event", event.event_id.as_bytes()]);
                    let causation = event.event_id;
                    self.run(instance, step, causation, Owned::Event(event))
                        .await?;
                    self.metrics.event_handled();
                }
            }
            Work::Timers(timers) => {
                for (due, name) in timers {
                    // Cancelled or moved meanwhile: not this timer any more.
                    if instance.timers.get(&name) != Some(&due) {
                        continue;
                    }
                    let step = derived_id(&[
                        P::NAME.as_bytes(),
                        b"timer",
                        instance.id.as_bytes(),
                        name.as_bytes(),
                        &due.to_be_bytes(),
                    ]);
                    // Remembered until its commands are all sent: an
                    // interruption after the step is recorded (it removes
                    // the timer) leaves them to be resent.
                    instance.resume.push(step);
                    self.metrics.timer_fired();
                    self.run(instance, step, step, Owned::Timer { name })
                        .await?;
                    instance.resume.retain(|resumed| *resumed != step);
                }
            }
            Work::Resume => {
                while let Some(&step) = instance.resume.first() {
                    // Only a recorded step is resent; one never recorded
                    // is decided when its timer fires (it is still set).
                    if instance.steps.contains_key(&step) {
                        let input = Owned::Timer {
                            name: String::new(),
                        };
                        self.run(instance, step, step, input).await?;
                    }
                    instance.resume.retain(|resumed| *resumed != step);
                }
            }
        }
        Ok(())
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// For the runtime: a workflow's handle and how to stop it.
pub(crate) fn same_name(handle: &WorkflowHandle, name: &str) -> bool {
    handle.shared.name == name
}
