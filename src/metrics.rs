//! What annals records through the [`metrics`](::metrics) facade crate: the
//! name of every metric and label as a constant, [`describe`] to give an
//! exporter their help texts and units, and (crate-private) the handles the
//! runtime, the stores, projections, the relay and process managers record
//! with. The service picks the exporter (Prometheus, StatsD, ...) by
//! installing a recorder; without one, every call is a no-op.
//!
//! Install the recorder **before** creating the [`Runtime`](crate::Runtime),
//! stores, projections and relays: each of them registers its handles once,
//! when it is created (so that a command costs an atomic add per metric, with
//! no label string allocated and no lookup), and a handle registered before
//! any recorder was installed records nothing.
//!
//! Names and labels follow Prometheus conventions: `snake_case`, the
//! `annals_` prefix, `_total` on counters, base units in the name
//! (`_seconds`). Labels: `aggregate` is the aggregate type's
//! [`Aggregate::CATEGORY`](crate::Aggregate::CATEGORY) (a bounded set, never a
//! stream id), `outcome` one of the listed values, `backend` `sled` or
//! `postgres`, `projection`, `relay` and `process` the configured names.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `annals_commands_total` | counter | aggregate, outcome | commands answered, by outcome: `committed` (also a command that had nothing to store), `refused` (the domain said no), `conflict` (still in conflict after the retries), `wrong_expected_version`, `overloaded`, `timeout`, `panicked`, `invalid` (bad id, refused aggregate type, bad metadata), `shut_down`, `error` (store, codec) |
//! | `annals_command_duration_seconds` | histogram | aggregate | time from `execute` to its answer, whatever the outcome |
//! | `annals_command_retries_total` | counter | aggregate, reason | commands decided again: `conflict` (the append met another writer), `stale` (stored nothing, decided on a state the stream had moved past) |
//! | `annals_aggregates_live` | gauge | aggregate | aggregate actors running (recovered, not yet stopped) |
//! | `annals_aggregate_recoveries_total` | counter | aggregate | actors started: snapshot loaded, tail replayed |
//! | `annals_aggregate_recovery_events` | histogram | aggregate | events replayed by one recovery, after its snapshot |
//! | `annals_aggregate_recovery_seconds` | histogram | aggregate | time one recovery took |
//! | `annals_aggregate_passivations_total` | counter | aggregate | actors stopped while idle (idle timeout, or least recently used past `max_live_aggregates`) |
//! | `annals_aggregate_panics_total` | counter | aggregate | panics in `handle` or `apply` (the actor is retired) |
//! | `annals_snapshots_total` | counter | aggregate, outcome | snapshot saves: `saved`, `failed` |
//! | `annals_store_appends_total` | counter | backend | appends acknowledged by the writer |
//! | `annals_store_events_total` | counter | backend | events written |
//! | `annals_store_group_commits_total` | counter | backend | group commits that wrote events (sled: one batch and one flush; PostgreSQL: one transaction) |
//! | `annals_store_group_commit_appends` | histogram | backend | appends per group commit |
//! | `annals_store_sync_seconds` | histogram | backend | sled: one flush plus fdatasync; PostgreSQL: one group's write transaction, BEGIN to COMMIT |
//! | `annals_store_write_failures_total` | counter | backend | group commits that failed (sled: the store is then poisoned) |
//! | `annals_projection_position` | gauge | projection | position of the last event handled |
//! | `annals_projection_checkpoint` | gauge | projection | position of the last saved checkpoint |
//! | `annals_projection_lag_events` | gauge | projection | positions between the store's head and the projection (updated at every step of the projection) |
//! | `annals_projection_events_total` | counter | projection | events handled (its rate is the handling rate) |
//! | `annals_projection_failures_total` | counter | projection | failed handler attempts, read-model commits and log reads |
//! | `annals_projection_skips_total` | counter | projection | events skipped under `FailurePolicy::SkipAndRecord` |
//! | `annals_relay_position` | gauge | relay | position of the last event the broker acknowledged |
//! | `annals_relay_lag_events` | gauge | relay | positions between the store's head and the relay |
//! | `annals_relay_events_total` | counter | relay | events the broker acknowledged |
//! | `annals_relay_failures_total` | counter | relay | failed publishes, log reads and checkpoint saves |
//! | `annals_process_instances` | gauge | process | live process-manager instances |
//! | `annals_process_events_total` | counter | process | events a process manager handled |
//! | `annals_process_commands_total` | counter | process, outcome | commands it sent: `committed`, `refused`, `error` |
//! | `annals_process_timers_pending` | gauge | process | durable timers set and not yet fired |
//! | `annals_process_timers_fired_total` | counter | process | timers fired |

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Label, Unit,
};

use crate::error::CommandError;
use crate::runtime::ObservedError;

/// `annals_commands_total`: commands answered, by aggregate and outcome.
pub const COMMANDS_TOTAL: &str = "annals_commands_total";
/// `annals_command_duration_seconds`: time to answer a command.
pub const COMMAND_DURATION_SECONDS: &str = "annals_command_duration_seconds";
/// `annals_command_retries_total`: commands decided again, by reason.
pub const COMMAND_RETRIES_TOTAL: &str = "annals_command_retries_total";
/// `annals_aggregates_live`: aggregate actors running.
pub const AGGREGATES_LIVE: &str = "annals_aggregates_live";
/// `annals_aggregate_recoveries_total`: actors recovered.
pub const AGGREGATE_RECOVERIES_TOTAL: &str = "annals_aggregate_recoveries_total";
/// `annals_aggregate_recovery_events`: events replayed per recovery.
pub const AGGREGATE_RECOVERY_EVENTS: &str = "annals_aggregate_recovery_events";
/// `annals_aggregate_recovery_seconds`: time per recovery.
pub const AGGREGATE_RECOVERY_SECONDS: &str = "annals_aggregate_recovery_seconds";
/// `annals_aggregate_passivations_total`: idle actors stopped.
pub const AGGREGATE_PASSIVATIONS_TOTAL: &str = "annals_aggregate_passivations_total";
/// `annals_aggregate_panics_total`: panics in the aggregate's code.
pub const AGGREGATE_PANICS_TOTAL: &str = "annals_aggregate_panics_total";
/// `annals_snapshots_total`: snapshot saves, by outcome.
pub const SNAPSHOTS_TOTAL: &str = "annals_snapshots_total";
/// `annals_store_appends_total`: appends acknowledged.
pub const STORE_APPENDS_TOTAL: &str = "annals_store_appends_total";
/// `annals_store_events_total`: events written.
pub const STORE_EVENTS_TOTAL: &str = "annals_store_events_total";
/// `annals_store_group_commits_total`: group commits that wrote events.
pub const STORE_GROUP_COMMITS_TOTAL: &str = "annals_store_group_commits_total";
/// `annals_store_group_commit_appends`: appends per group commit.
pub const STORE_GROUP_COMMIT_APPENDS: &str = "annals_store_group_commit_appends";
/// `annals_store_sync_seconds`: time to make one group durable.
pub const STORE_SYNC_SECONDS: &str = "annals_store_sync_seconds";
/// `annals_store_write_failures_total`: failed group commits.
pub const STORE_WRITE_FAILURES_TOTAL: &str = "annals_store_write_failures_total";
/// `annals_projection_position`: last position handled.
pub const PROJECTION_POSITION: &str = "annals_projection_position";
/// `annals_projection_checkpoint`: last checkpoint saved.
pub const PROJECTION_CHECKPOINT: &str = "annals_projection_checkpoint";
/// `annals_projection_lag_events`: positions behind the store's head.
pub const PROJECTION_LAG_EVENTS: &str = "annals_projection_lag_events";
/// `annals_projection_events_total`: events handled.
pub const PROJECTION_EVENTS_TOTAL: &str = "annals_projection_events_total";
/// `annals_projection_failures_total`: failures (handler, commit, read).
pub const PROJECTION_FAILURES_TOTAL: &str = "annals_projection_failures_total";
/// `annals_projection_skips_total`: events skipped after a failure.
pub const PROJECTION_SKIPS_TOTAL: &str = "annals_projection_skips_total";
/// `annals_relay_position`: last position acknowledged by the broker.
pub const RELAY_POSITION: &str = "annals_relay_position";
/// `annals_relay_lag_events`: positions behind the store's head.
pub const RELAY_LAG_EVENTS: &str = "annals_relay_lag_events";
/// `annals_relay_events_total`: events acknowledged by the broker.
pub const RELAY_EVENTS_TOTAL: &str = "annals_relay_events_total";
/// `annals_relay_failures_total`: failed publishes, reads, saves.
pub const RELAY_FAILURES_TOTAL: &str = "annals_relay_failures_total";
/// `annals_process_instances`: live process-manager instances.
pub const PROCESS_INSTANCES: &str = "annals_process_instances";
/// `annals_process_events_total`: events a process manager handled.
pub const PROCESS_EVENTS_TOTAL: &str = "annals_process_events_total";
/// `annals_process_commands_total`: commands a process manager sent.
pub const PROCESS_COMMANDS_TOTAL: &str = "annals_process_commands_total";
/// `annals_process_timers_pending`: timers set, not yet fired.
pub const PROCESS_TIMERS_PENDING: &str = "annals_process_timers_pending";
/// `annals_process_timers_fired_total`: timers fired.
pub const PROCESS_TIMERS_FIRED_TOTAL: &str = "annals_process_timers_fired_total";

/// Label: the aggregate type's category.
pub const LABEL_AGGREGATE: &str = "aggregate";
/// Label: how a command (or a save) ended.
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: why a command was decided again.
pub const LABEL_REASON: &str = "reason";
/// Label: the store backend, `sled` or `postgres`.
pub const LABEL_BACKEND: &str = "backend";
/// Label: the projection's name.
pub const LABEL_PROJECTION: &str = "projection";
/// Label: the relay's name.
pub const LABEL_RELAY: &str = "relay";
/// Label: the process manager's name.
pub const LABEL_PROCESS: &str = "process";

/// Gives the installed recorder the unit and help text of every metric
/// above (a Prometheus exporter prints them as `# HELP` lines). Call it once,
/// after installing the recorder; recording works without it.
pub fn describe() {
    describe_counter!(
        COMMANDS_TOTAL,
        Unit::Count,
        "Commands answered, by aggregate type and outcome."
    );
    describe_histogram!(
        COMMAND_DURATION_SECONDS,
        Unit::Seconds,
        "Time from execute to its answer."
    );
    describe_counter!(
        COMMAND_RETRIES_TOTAL,
        Unit::Count,
        "Commands decided again after a conflict or on a stale state."
    );
    describe_gauge!(AGGREGATES_LIVE, Unit::Count, "Aggregate actors running.");
    describe_counter!(
        AGGREGATE_RECOVERIES_TOTAL,
        Unit::Count,
        "Aggregate actors recovered from snapshot and tail."
    );
    describe_histogram!(
        AGGREGATE_RECOVERY_EVENTS,
        Unit::Count,
        "Events replayed per recovery, after the snapshot."
    );
    describe_histogram!(
        AGGREGATE_RECOVERY_SECONDS,
        Unit::Seconds,
        "Time per recovery."
    );
    describe_counter!(
        AGGREGATE_PASSIVATIONS_TOTAL,
        Unit::Count,
        "Idle aggregate actors stopped."
    );
    describe_counter!(
        AGGREGATE_PANICS_TOTAL,
        Unit::Count,
        "Panics in an aggregate's handle or apply."
    );
    describe_counter!(SNAPSHOTS_TOTAL, Unit::Count, "Snapshot saves, by outcome.");
    describe_counter!(
        STORE_APPENDS_TOTAL,
        Unit::Count,
        "Appends acknowledged by the store's writer."
    );
    describe_counter!(
        STORE_EVENTS_TOTAL,
        Unit::Count,
        "Events written by the store's writer."
    );
    describe_counter!(
        STORE_GROUP_COMMITS_TOTAL,
        Unit::Count,
        "Group commits that wrote events."
    );
    describe_histogram!(
        STORE_GROUP_COMMIT_APPENDS,
        Unit::Count,
        "Appends per group commit."
    );
    describe_histogram!(
        STORE_SYNC_SECONDS,
        Unit::Seconds,
        "Time to make one group durable (sled: flush and fdatasync; PostgreSQL: the transaction)."
    );
    describe_counter!(
        STORE_WRITE_FAILURES_TOTAL,
        Unit::Count,
        "Group commits that failed."
    );
    describe_gauge!(
        PROJECTION_POSITION,
        Unit::Count,
        "Position of the last event the projection handled."
    );
    describe_gauge!(
        PROJECTION_CHECKPOINT,
        Unit::Count,
        "Position of the projection's last saved checkpoint."
    );
    describe_gauge!(
        PROJECTION_LAG_EVENTS,
        Unit::Count,
        "Positions between the store's head and the projection."
    );
    describe_counter!(
        PROJECTION_EVENTS_TOTAL,
        Unit::Count,
        "Events the projection handled."
    );
    describe_counter!(
        PROJECTION_FAILURES_TOTAL,
        Unit::Count,
        "Projection failures: handler attempts, read-model commits, log reads."
    );
    describe_counter!(
        PROJECTION_SKIPS_TOTAL,
        Unit::Count,
        "Events the projection skipped after its handler failed."
    );
    describe_gauge!(
        RELAY_POSITION,
        Unit::Count,
        "Position of the last event the broker acknowledged."
    );
    describe_gauge!(
        RELAY_LAG_EVENTS,
        Unit::Count,
        "Positions between the store's head and the relay."
    );
    describe_counter!(
        RELAY_EVENTS_TOTAL,
        Unit::Count,
        "Events the broker acknowledged."
    );
    describe_counter!(
        RELAY_FAILURES_TOTAL,
        Unit::Count,
        "Relay failures: publishes, log reads, checkpoint saves."
    );
    describe_gauge!(
        PROCESS_INSTANCES,
        Unit::Count,
        "Live process-manager instances."
    );
    describe_counter!(
        PROCESS_EVENTS_TOTAL,
        Unit::Count,
        "Events a process manager handled."
    );
    describe_counter!(
        PROCESS_COMMANDS_TOTAL,
        Unit::Count,
        "Commands a process manager sent, by outcome."
    );
    describe_gauge!(
        PROCESS_TIMERS_PENDING,
        Unit::Count,
        "Durable timers set and not yet fired."
    );
    describe_counter!(
        PROCESS_TIMERS_FIRED_TOTAL,
        Unit::Count,
        "Durable timers fired."
    );
}

fn labels(key: &'static str, value: impl Into<::metrics::SharedString>) -> Vec<Label> {
    vec![Label::new(key, value)]
}

/// A position or count as a gauge value (exact up to 2^53).
#[allow(clippy::cast_precision_loss)]
fn as_f64(value: u64) -> f64 {
    value as f64
}

/// The handles of one aggregate type, registered once per runtime and type
/// (see [`AggregateMetricsCache`]): recording a command is then a few
/// atomic operations, with no label built and no map lookup.
pub(crate) struct AggregateMetrics {
    committed: Counter,
    refused: Counter,
    conflict: Counter,
    wrong_expected_version: Counter,
    overloaded: Counter,
    timeout: Counter,
    panicked: Counter,
    invalid: Counter,
    shut_down: Counter,
    error: Counter,
    duration: Histogram,
    retried_conflict: Counter,
    retried_stale: Counter,
    live: Gauge,
    recoveries: Counter,
    recovery_events: Histogram,
    recovery_seconds: Histogram,
    passivations: Counter,
    panics: Counter,
    snapshots_saved: Counter,
    snapshots_failed: Counter,
    /// What the runtime's health reports of appends and errors.
    watch: Arc<HealthWatch>,
}

impl fmt::Debug for AggregateMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateMetrics").finish_non_exhaustive()
    }
}

impl AggregateMetrics {
    fn new(category: &'static str, watch: Arc<HealthWatch>) -> Self {
        let one = || labels(LABEL_AGGREGATE, category);
        let outcome = |outcome: &'static str| {
            let mut labels = one();
            labels.push(Label::from_static_parts(LABEL_OUTCOME, outcome));
            counter!(COMMANDS_TOTAL, labels)
        };
        let retry = |reason: &'static str| {
            let mut labels = one();
            labels.push(Label::from_static_parts(LABEL_REASON, reason));
            counter!(COMMAND_RETRIES_TOTAL, labels)
        };
        let snapshot = |outcome: &'static str| {
            let mut labels = one();
            labels.push(Label::from_static_parts(LABEL_OUTCOME, outcome));
            counter!(SNAPSHOTS_TOTAL, labels)
        };
        Self {
            committed: outcome("committed"),
            refused: outcome("refused"),
            conflict: outcome("conflict"),
            wrong_expected_version: outcome("wrong_expected_version"),
            overloaded: outcome("overloaded"),
            timeout: outcome("timeout"),
            panicked: outcome("panicked"),
            invalid: outcome("invalid"),
            shut_down: outcome("shut_down"),
            error: outcome("error"),
            duration: histogram!(COMMAND_DURATION_SECONDS, one()),
            retried_conflict: retry("conflict"),
            retried_stale: retry("stale"),
            live: gauge!(AGGREGATES_LIVE, one()),
            recoveries: counter!(AGGREGATE_RECOVERIES_TOTAL, one()),
            recovery_events: histogram!(AGGREGATE_RECOVERY_EVENTS, one()),
            recovery_seconds: histogram!(AGGREGATE_RECOVERY_SECONDS, one()),
            passivations: counter!(AGGREGATE_PASSIVATIONS_TOTAL, one()),
            panics: counter!(AGGREGATE_PANICS_TOTAL, one()),
            snapshots_saved: snapshot("saved"),
            snapshots_failed: snapshot("failed"),
            watch,
        }
    }

    /// Records a command's answer and how long it took since `started`.
    pub(crate) fn command<T, E: std::error::Error>(
        &self,
        result: &Result<T, CommandError<E>>,
        started: Instant,
    ) {
        self.duration.record(started.elapsed());
        let counter = match result {
            Ok(_) => &self.committed,
            Err(CommandError::Domain(_)) => &self.refused,
            Err(CommandError::Conflict { .. }) => &self.conflict,
            Err(CommandError::WrongExpectedVersion { .. }) => &self.wrong_expected_version,
            Err(CommandError::Overloaded { .. }) => &self.overloaded,
            Err(CommandError::Timeout { .. }) => &self.timeout,
            Err(CommandError::ShutDown) => &self.shut_down,
            Err(CommandError::InvalidInput(_) | CommandError::Category(_)) => &self.invalid,
            Err(error @ CommandError::AggregatePanicked { .. }) => {
                self.watch.error(error);
                &self.panicked
            }
            Err(error) => {
                self.watch.error(error);
                &self.error
            }
        };
        counter.increment(1);
    }

    /// A command is decided again after its append met another writer.
    pub(crate) fn retried_after_conflict(&self) {
        self.retried_conflict.increment(1);
    }

    /// A command that stored nothing is decided again on a caught-up state.
    pub(crate) fn retried_on_stale_state(&self) {
        self.retried_stale.increment(1);
    }

    /// The runtime's append went through: the store takes writes.
    pub(crate) fn append_succeeded(&self) {
        self.watch.append_succeeded();
    }

    /// The runtime's append failed in the store.
    pub(crate) fn append_failed(&self, error: &dyn fmt::Display) {
        self.watch.append_failed(error);
    }

    pub(crate) fn passivated(&self) {
        self.passivations.increment(1);
    }

    pub(crate) fn panicked(&self) {
        self.panics.increment(1);
    }

    pub(crate) fn snapshot_saved(&self) {
        self.snapshots_saved.increment(1);
    }

    pub(crate) fn snapshot_failed(&self) {
        self.snapshots_failed.increment(1);
    }
}

/// One aggregate actor's view of its type's metrics: counts the actor as
/// live from its recovery until it is dropped (however it stops).
pub(crate) struct ActorMetrics {
    shared: Arc<AggregateMetrics>,
    live: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for ActorMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActorMetrics").finish_non_exhaustive()
    }
}

impl ActorMetrics {
    pub(crate) fn new(shared: Arc<AggregateMetrics>) -> Self {
        Self {
            shared,
            live: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The actor recovered from the store, replaying `replayed` events
    /// after its snapshot (a start from a warm idle state recovers nothing).
    pub(crate) fn recovered(&self, replayed: u64, took: Duration) {
        let shared = &self.shared;
        shared.recoveries.increment(1);
        shared.recovery_events.record(as_f64(replayed));
        shared.recovery_seconds.record(took);
    }

    /// The actor started, however it got its state: it counts as live
    /// until it is dropped.
    pub(crate) fn started(&self) {
        if !self.live.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.shared.live.increment(1.0);
        }
    }

    /// The type's shared handles (for the snapshot task).
    pub(crate) fn shared(&self) -> Arc<AggregateMetrics> {
        Arc::clone(&self.shared)
    }
}

impl std::ops::Deref for ActorMetrics {
    type Target = AggregateMetrics;

    fn deref(&self) -> &AggregateMetrics {
        &self.shared
    }
}

impl Drop for ActorMetrics {
    fn drop(&mut self) {
        if *self.live.get_mut() {
            self.shared.live.decrement(1.0);
        }
    }
}

/// The aggregate types' handles of one runtime, registered on first use of
/// each type (a handle made per call of `Runtime::aggregates` would cost a
/// registration per call). A std mutex: no await while it is held.
#[derive(Debug, Default)]
pub(crate) struct AggregateMetricsCache {
    types: Mutex<HashMap<&'static str, Arc<AggregateMetrics>>>,
    watch: Arc<HealthWatch>,
}

impl AggregateMetricsCache {
    /// The handles of the aggregate type of `category`.
    pub(crate) fn aggregate(&self, category: &'static str) -> Arc<AggregateMetrics> {
        let mut types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            types.entry(category).or_insert_with(|| {
                Arc::new(AggregateMetrics::new(category, Arc::clone(&self.watch)))
            }),
        )
    }

    /// What the runtime saw of its store and of errors.
    pub(crate) fn watch(&self) -> &HealthWatch {
        &self.watch
    }
}

/// What the runtime's actors saw of appends and errors, for
/// `Runtime::health`. A success costs one read of a flag no one writes
/// while the store works, so that the command path shares no written
/// cache line.
#[derive(Debug, Default)]
pub(crate) struct HealthWatch {
    failing: std::sync::atomic::AtomicBool,
    failed_appends: std::sync::atomic::AtomicU64,
    last_append_failure: Mutex<Option<ObservedError>>,
    last_error: Mutex<Option<ObservedError>>,
}

impl HealthWatch {
    fn append_succeeded(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.failing.load(Relaxed) {
            self.failing.store(false, Relaxed);
        }
    }

    fn append_failed(&self, error: &dyn fmt::Display) {
        use std::sync::atomic::Ordering::Relaxed;
        let observed = ObservedError::now(error);
        *self
            .last_append_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(observed.clone());
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(observed);
        self.failed_appends.fetch_add(1, Relaxed);
        self.failing.store(true, Relaxed);
    }

    /// Records `error` as the last error seen.
    pub(crate) fn error(&self, error: &dyn fmt::Display) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(ObservedError::now(error));
    }

    /// Whether the last append the runtime made failed in the store.
    pub(crate) fn last_append_failed(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn failed_appends(&self) -> u64 {
        self.failed_appends
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn last_append_failure(&self) -> Option<ObservedError> {
        self.last_append_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn last_error(&self) -> Option<ObservedError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The handles of one store's writer (label `backend`), recorded once per
/// group commit.
#[derive(Clone)]
pub(crate) struct StoreMetrics {
    appends: Counter,
    events: Counter,
    group_commits: Counter,
    group_size: Histogram,
    sync_seconds: Histogram,
    failures: Counter,
}

impl fmt::Debug for StoreMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreMetrics").finish_non_exhaustive()
    }
}

impl StoreMetrics {
    pub(crate) fn new(backend: &'static str) -> Self {
        let one = || labels(LABEL_BACKEND, backend);
        Self {
            appends: counter!(STORE_APPENDS_TOTAL, one()),
            events: counter!(STORE_EVENTS_TOTAL, one()),
            group_commits: counter!(STORE_GROUP_COMMITS_TOTAL, one()),
            group_size: histogram!(STORE_GROUP_COMMIT_APPENDS, one()),
            sync_seconds: histogram!(STORE_SYNC_SECONDS, one()),
            failures: counter!(STORE_WRITE_FAILURES_TOTAL, one()),
        }
    }

    /// A group commit acknowledged `appends` appends that wrote `events`
    /// events (a group of idempotent retries only writes none).
    pub(crate) fn group_committed(&self, appends: u64, events: u64) {
        self.appends.increment(appends);
        if events > 0 {
            self.events.increment(events);
            self.group_commits.increment(1);
            self.group_size.record(as_f64(appends));
        }
    }

    /// A group commit failed.
    pub(crate) fn group_failed(&self) {
        self.failures.increment(1);
    }

    /// Records the time from now until the returned guard is dropped in
    /// `annals_store_sync_seconds`.
    pub(crate) fn time_sync(&self) -> SyncTimer {
        SyncTimer {
            histogram: self.sync_seconds.clone(),
            started: Instant::now(),
        }
    }

    /// Records one sync that took `took`.
    pub(crate) fn synced(&self, took: Duration) {
        self.sync_seconds.record(took);
    }
}

/// Records its lifetime in `annals_store_sync_seconds` when dropped.
pub(crate) struct SyncTimer {
    histogram: Histogram,
    started: Instant,
}

impl Drop for SyncTimer {
    fn drop(&mut self) {
        self.histogram.record(self.started.elapsed());
    }
}

/// The handles of one projection (label `projection`), recorded at each
/// step of its actor.
pub(crate) struct ProjectionMetrics {
    position: Gauge,
    checkpoint: Gauge,
    lag: Gauge,
    events: Counter,
    failures: Counter,
    skips: Counter,
    /// `events_handled` at the last step, to count the difference.
    handled: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for ProjectionMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionMetrics").finish_non_exhaustive()
    }
}

impl ProjectionMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let one = || labels(LABEL_PROJECTION, name.to_owned());
        Self {
            position: gauge!(PROJECTION_POSITION, one()),
            checkpoint: gauge!(PROJECTION_CHECKPOINT, one()),
            lag: gauge!(PROJECTION_LAG_EVENTS, one()),
            events: counter!(PROJECTION_EVENTS_TOTAL, one()),
            failures: counter!(PROJECTION_FAILURES_TOTAL, one()),
            skips: counter!(PROJECTION_SKIPS_TOTAL, one()),
            handled: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The projection's progress after a step: its position and checkpoint,
    /// the store's head, and its count of events handled (which a reset
    /// sets back to zero).
    pub(crate) fn progress(
        &self,
        position: crate::event::Position,
        checkpoint: crate::event::Position,
        head: crate::event::Position,
        handled: u64,
    ) {
        self.position.set(as_f64(position.0));
        self.checkpoint.set(as_f64(checkpoint.0));
        self.lag.set(as_f64(head.0.saturating_sub(position.0)));
        let before = self
            .handled
            .swap(handled, std::sync::atomic::Ordering::Relaxed);
        if handled > before {
            self.events.increment(handled - before);
        }
    }

    pub(crate) fn failed(&self) {
        self.failures.increment(1);
    }

    pub(crate) fn skipped(&self) {
        self.skips.increment(1);
    }
}

/// The handles of one relay (label `relay`).
pub(crate) struct RelayMetrics {
    position: Gauge,
    lag: Gauge,
    events: Counter,
    failures: Counter,
}

impl fmt::Debug for RelayMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayMetrics").finish_non_exhaustive()
    }
}

impl RelayMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let one = || labels(LABEL_RELAY, name.to_owned());
        Self {
            position: gauge!(RELAY_POSITION, one()),
            lag: gauge!(RELAY_LAG_EVENTS, one()),
            events: counter!(RELAY_EVENTS_TOTAL, one()),
            failures: counter!(RELAY_FAILURES_TOTAL, one()),
        }
    }

    /// The broker acknowledged `events` events, up to `position`.
    pub(crate) fn advanced(
        &self,
        position: crate::event::Position,
        head: crate::event::Position,
        events: u64,
    ) {
        self.position.set(as_f64(position.0));
        self.events.increment(events);
        self.behind(position, head);
    }

    /// A publish failed while the relay stood at `position` and the log at
    /// `head`: the lag keeps moving while the broker is away, so an alert
    /// on it fires when it should.
    pub(crate) fn failed(&self, position: crate::event::Position, head: crate::event::Position) {
        self.behind(position, head);
        self.failures.increment(1);
    }

    fn behind(&self, position: crate::event::Position, head: crate::event::Position) {
        self.lag.set(as_f64(head.0.saturating_sub(position.0)));
    }
}

/// The handles of one process manager (label `process`), for the workflow
/// layer: made once when the process manager starts, then one call per
/// event, command or timer.
pub(crate) struct ProcessMetrics {
    instances: Gauge,
    events: Counter,
    committed: Counter,
    refused: Counter,
    error: Counter,
    timers_pending: Gauge,
    timers_fired: Counter,
}

impl fmt::Debug for ProcessMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessMetrics").finish_non_exhaustive()
    }
}

impl ProcessMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let one = || labels(LABEL_PROCESS, name.to_owned());
        let outcome = |outcome: &'static str| {
            let mut labels = one();
            labels.push(Label::from_static_parts(LABEL_OUTCOME, outcome));
            counter!(PROCESS_COMMANDS_TOTAL, labels)
        };
        Self {
            instances: gauge!(PROCESS_INSTANCES, one()),
            events: counter!(PROCESS_EVENTS_TOTAL, one()),
            committed: outcome("committed"),
            refused: outcome("refused"),
            error: outcome("error"),
            timers_pending: gauge!(PROCESS_TIMERS_PENDING, one()),
            timers_fired: counter!(PROCESS_TIMERS_FIRED_TOTAL, one()),
        }
    }

    /// The number of live instances is now `count`.
    pub(crate) fn instances(&self, count: usize) {
        self.instances.set(as_f64(count as u64));
    }

    /// One event handled.
    pub(crate) fn event_handled(&self) {
        self.events.increment(1);
    }

    /// A command sent: committed, refused by the domain, or failed otherwise.
    pub(crate) fn command(&self, sent: &crate::workflow::Sent) {
        use crate::workflow::Sent;
        match sent {
            Sent::Done => &self.committed,
            Sent::Refused(_) => &self.refused,
            Sent::Failed(_) => &self.error,
        }
        .increment(1);
    }

    /// The number of timers set and not yet fired is now `count`.
    pub(crate) fn timers_pending(&self, count: usize) {
        self.timers_pending.set(as_f64(count as u64));
    }

    /// A timer fired.
    pub(crate) fn timer_fired(&self) {
        self.timers_fired.increment(1);
    }
}
