//! How a runtime hosts aggregates: [`RuntimeConfig`], built and checked by
//! [`RuntimeConfigBuilder`], with [`AggregateSettings`] that override the
//! snapshot interval and idle timeout for one aggregate type (as
//! Commanded's lifespan per aggregate does).

use std::any::TypeId;
use std::collections::HashMap;
use std::time::Duration;

use crate::aggregate::Aggregate;
use crate::error::{at_least_one, InvalidInput};

/// How a [`crate::Runtime`] hosts aggregates. `RuntimeConfig::default()` is
/// valid; [`RuntimeConfig::builder`] changes settings and checks them all
/// at [`RuntimeConfigBuilder::build`]. Getters are named like the setters.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    snapshot_every: u64,
    idle_timeout: Duration,
    max_live_aggregates: usize,
    max_idle_aggregates: usize,
    sweep_interval: Option<Duration>,
    max_pending_commands: usize,
    command_timeout: Duration,
    max_conflict_retries: u32,
    per_type: HashMap<TypeId, AggregateSettings>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            snapshot_every: 100,
            idle_timeout: Duration::from_secs(300),
            max_live_aggregates: 100_000,
            max_idle_aggregates: 100_000,
            sweep_interval: None,
            max_pending_commands: 1024,
            command_timeout: Duration::from_secs(10),
            max_conflict_retries: 3,
            per_type: HashMap::new(),
        }
    }
}

impl RuntimeConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> RuntimeConfigBuilder {
        RuntimeConfigBuilder {
            config: Self::default(),
        }
    }

    /// A builder starting from these settings.
    pub fn to_builder(&self) -> RuntimeConfigBuilder {
        RuntimeConfigBuilder {
            config: self.clone(),
        }
    }

    /// A snapshot is taken every this many events of a stream (0: never),
    /// unless the aggregate type overrides it. Default 100.
    pub fn snapshot_every(&self) -> u64 {
        self.snapshot_every
    }

    /// An aggregate's actor stops after this long without a command, unless
    /// the aggregate type overrides it; its state stays idle (see
    /// [`RuntimeConfig::max_idle_aggregates`]), or the next command reloads
    /// it from the store. Checked by one sweep per runtime (see
    /// [`RuntimeConfig::sweep_interval`]), so an actor stops between this
    /// long and this long plus the sweep interval. Default 5 minutes.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Past this many live actors, the least recently used idle ones stop
    /// (down to 90% of it), their states staying idle (see
    /// [`RuntimeConfig::max_idle_aggregates`]). Default 100,000.
    pub fn max_live_aggregates(&self) -> usize {
        self.max_live_aggregates
    }

    /// How many idle aggregates the runtime keeps warm. An actor that stops
    /// for being idle or least recently used leaves its state and version
    /// in memory, with no actor (a few hundred bytes beyond the state
    /// itself, against about 10 KB for a live actor); the aggregate's next
    /// command or query starts an actor from that state without reading the
    /// store. Past this many, the longest idle states are dropped (down to
    /// 90% of it), and those aggregates reload from the store: the states
    /// are only a cache. A state made stale by another writer (another
    /// process on a shared store) is caught by the append's expected
    /// version and caught up, as for a live actor. 0 keeps none: every
    /// stopped aggregate reloads. A panicked actor's state is never kept.
    /// Default 100,000.
    pub fn max_idle_aggregates(&self) -> usize {
        self.max_idle_aggregates
    }

    /// How often the runtime's one sweep looks for actors idle past their
    /// timeout, if set; otherwise (the default) a quarter of the shortest
    /// idle timeout (the runtime's or an aggregate type's), between 1 ms
    /// and 1 second. See [`RuntimeConfig::sweep_period`] for the period
    /// used.
    pub fn sweep_interval(&self) -> Option<Duration> {
        self.sweep_interval
    }

    /// The period of the idle sweep: [`RuntimeConfig::sweep_interval`] if
    /// set, else a quarter of the shortest idle timeout, between 1 ms and
    /// 1 second.
    pub fn sweep_period(&self) -> Duration {
        if let Some(interval) = self.sweep_interval {
            return interval;
        }
        let shortest = self
            .per_type
            .values()
            .filter_map(|settings| settings.idle_timeout)
            .fold(self.idle_timeout, Duration::min);
        (shortest / 4).clamp(Duration::from_millis(1), Duration::from_secs(1))
    }

    /// Commands (and `state` queries, which queue behind them) one
    /// aggregate may have waiting or running; past it, `execute` fails at
    /// once with [`crate::CommandError::Overloaded`] and `state` with
    /// [`crate::QueryError::Overloaded`]. Default 1,024.
    pub fn max_pending_commands(&self) -> usize {
        self.max_pending_commands
    }

    /// How long `execute` waits for an answer, including the aggregate's
    /// recovery; also how long [`crate::Runtime::shutdown`] waits for each
    /// of its stages. Default 10 seconds.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// How many times a command is decided again on a caught-up state:
    /// after its append conflicted with another writer, or when it stored
    /// nothing (a domain refusal, or no events) and the stream had moved
    /// past the state it was decided on. Both share this budget. Past it,
    /// a conflict is [`crate::CommandError::Conflict`], and a command that
    /// stored nothing is answered as decided on the last state caught up
    /// to. A command with an expected version is never retried. Default 3.
    pub fn max_conflict_retries(&self) -> u32 {
        self.max_conflict_retries
    }

    /// The settings aggregates of type `A` run with: its overrides, the
    /// runtime's defaults for the rest.
    pub fn aggregate<A: Aggregate>(&self) -> AggregateSettings {
        let resolved = self.settings_of(TypeId::of::<A>());
        AggregateSettings::new()
            .snapshot_every(resolved.snapshot_every)
            .idle_timeout(resolved.idle_timeout)
    }

    pub(crate) fn settings_of(&self, aggregate: TypeId) -> TypeSettings {
        let overrides = self.per_type.get(&aggregate);
        TypeSettings {
            snapshot_every: overrides
                .and_then(|s| s.snapshot_every)
                .unwrap_or(self.snapshot_every),
            idle_timeout: overrides
                .and_then(|s| s.idle_timeout)
                .unwrap_or(self.idle_timeout),
        }
    }
}

/// Sets up a [`RuntimeConfig`]; [`RuntimeConfigBuilder::build`] refuses
/// invalid settings with a typed error instead of adjusting them.
#[derive(Clone, Debug)]
pub struct RuntimeConfigBuilder {
    config: RuntimeConfig,
}

impl RuntimeConfigBuilder {
    /// Sets how many events pass between snapshots (0: never).
    pub fn snapshot_every(mut self, events: u64) -> Self {
        self.config.snapshot_every = events;
        self
    }

    /// Sets the idle time after which an actor stops (at least 1 ms).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// Sets the maximum of live actors (at least 1).
    pub fn max_live_aggregates(mut self, max: usize) -> Self {
        self.config.max_live_aggregates = max;
        self
    }

    /// Sets how many idle aggregates stay warm (0: none; see
    /// [`RuntimeConfig::max_idle_aggregates`]).
    pub fn max_idle_aggregates(mut self, max: usize) -> Self {
        self.config.max_idle_aggregates = max;
        self
    }

    /// Sets the period of the idle sweep (at least 1 ms; see
    /// [`RuntimeConfig::sweep_interval`]).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.config.sweep_interval = Some(interval);
        self
    }

    /// Sets the maximum of pending commands per aggregate (at least 1).
    pub fn max_pending_commands(mut self, max: usize) -> Self {
        self.config.max_pending_commands = max;
        self
    }

    /// Sets the command timeout (at least 1 ms).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.config.command_timeout = timeout;
        self
    }

    /// Sets how many times a command is decided again on a caught-up state
    /// (see [`RuntimeConfig::max_conflict_retries`]).
    pub fn max_conflict_retries(mut self, retries: u32) -> Self {
        self.config.max_conflict_retries = retries;
        self
    }

    /// Overrides settings for aggregates of type `A`; what `settings`
    /// leaves unset comes from the runtime's defaults. A later call for the
    /// same type replaces an earlier one.
    pub fn aggregate<A: Aggregate>(mut self, settings: AggregateSettings) -> Self {
        self.config.per_type.insert(TypeId::of::<A>(), settings);
        self
    }

    /// The configuration, once every setting is checked.
    ///
    /// # Errors
    /// [`InvalidInput::TooSmall`] naming the first setting below its
    /// minimum: `max_live_aggregates` and `max_pending_commands` at least
    /// 1, `command_timeout`, `sweep_interval` (if set) and every
    /// `idle_timeout` (the runtime's and each aggregate type's) at least
    /// 1 ms.
    pub fn build(self) -> Result<RuntimeConfig, InvalidInput> {
        let config = self.config;
        at_least_one("max_live_aggregates", config.max_live_aggregates as u64)?;
        at_least_one("max_pending_commands", config.max_pending_commands as u64)?;
        at_least_one("command_timeout_ms", millis(config.command_timeout))?;
        at_least_one("idle_timeout_ms", millis(config.idle_timeout))?;
        if let Some(interval) = config.sweep_interval {
            at_least_one("sweep_interval_ms", millis(interval))?;
        }
        for settings in config.per_type.values() {
            if let Some(timeout) = settings.idle_timeout {
                at_least_one("idle_timeout_ms", millis(timeout))?;
            }
        }
        Ok(config)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Settings for one aggregate type, given to
/// [`RuntimeConfigBuilder::aggregate`]; each one left unset takes the
/// runtime's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggregateSettings {
    snapshot_every: Option<u64>,
    idle_timeout: Option<Duration>,
}

impl AggregateSettings {
    /// No override: every setting is the runtime's.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how many events pass between this type's snapshots (0: never).
    pub fn snapshot_every(mut self, events: u64) -> Self {
        self.snapshot_every = Some(events);
        self
    }

    /// Sets the idle time after which this type's actors stop (at least
    /// 1 ms, checked at [`RuntimeConfigBuilder::build`]).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }

    /// The snapshot interval set here, if any (from
    /// [`RuntimeConfig::aggregate`]: always set, resolved).
    pub fn snapshot_every_setting(&self) -> Option<u64> {
        self.snapshot_every
    }

    /// The idle timeout set here, if any (from
    /// [`RuntimeConfig::aggregate`]: always set, resolved).
    pub fn idle_timeout_setting(&self) -> Option<Duration> {
        self.idle_timeout
    }
}

/// An aggregate type's settings with the runtime's defaults filled in, as
/// its actors use them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TypeSettings {
    pub(crate) snapshot_every: u64,
    pub(crate) idle_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_are_typed_errors_at_build() {
        let cases = [
            (
                RuntimeConfig::builder().max_live_aggregates(0),
                "max_live_aggregates",
            ),
            (
                RuntimeConfig::builder().max_pending_commands(0),
                "max_pending_commands",
            ),
            (
                RuntimeConfig::builder().command_timeout(Duration::ZERO),
                "command_timeout_ms",
            ),
            (
                RuntimeConfig::builder().idle_timeout(Duration::from_micros(10)),
                "idle_timeout_ms",
            ),
            (
                RuntimeConfig::builder().sweep_interval(Duration::from_micros(999)),
                "sweep_interval_ms",
            ),
        ];
        for (builder, setting) in cases {
            match builder.build() {
                Err(InvalidInput::TooSmall { what, .. }) => assert_eq!(what, setting),
                other => panic!("{setting}: expected TooSmall, got {other:?}"),
            }
        }
        let built = RuntimeConfig::builder()
            .max_live_aggregates(1)
            .snapshot_every(0)
            .build()
            .unwrap();
        assert_eq!(built.max_live_aggregates(), 1, "no silent clamp");
        assert_eq!(built.snapshot_every(), 0);
        let no_cache = RuntimeConfig::builder()
            .max_idle_aggregates(0)
            .build()
            .unwrap();
        assert_eq!(no_cache.max_idle_aggregates(), 0, "0 is valid: no cache");
    }

    #[test]
    fn the_sweep_period_follows_the_shortest_idle_timeout() {
        let default = RuntimeConfig::default();
        assert_eq!(default.sweep_period(), Duration::from_secs(1), "capped");
        let mut short = RuntimeConfig::builder()
            .idle_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        assert_eq!(short.sweep_period(), Duration::from_millis(500));
        // An aggregate type's shorter timeout sets the pace.
        short.per_type.insert(
            TypeId::of::<u8>(),
            AggregateSettings::new().idle_timeout(Duration::from_millis(2)),
        );
        assert_eq!(short.sweep_period(), Duration::from_millis(1), "floor");
        let explicit = short
            .to_builder()
            .sweep_interval(Duration::from_millis(70))
            .build()
            .unwrap();
        assert_eq!(explicit.sweep_period(), Duration::from_millis(70));
    }
}
