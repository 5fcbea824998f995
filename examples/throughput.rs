//! The figures of issues 5 and 14, in one run: durable commands/s through
//! the runtime; the store alone under 1,024 concurrent appenders beside an
//! SQLite baseline built as a competent user would (`baselines/sqlite.rs`)
//! under the same load; the physical limit of a durable log on this disk
//! (the same encoded records to a plain file, one `write` + `fdatasync` per
//! group of the runtime's mean group size, one thread) and the median
//! `fdatasync`; latency under an open-loop load at half the maximum
//! (below); projection catch-up beside SQLite's scan of as many events and
//! beside decoding the same records from memory; an aggregate's recovery
//! after a restart (streams of 1,000 to 100,000 events, replayed whole or
//! from a snapshot near the head); memory per live idle aggregate and per
//! stored event; and the time to open a store of a million events (ten
//! million with `--10m`).
//!
//! ```text
//! cargo run --release --example throughput            # a minute (idle 2 cores)
//! cargo run --release --example throughput -- --quick # a tenth of it
//! cargo run --release --example throughput -- --10m   # + a 10M-event store (~4 GB)
//! ANNALS_THROUGHPUT_SCALE=3 cargo run --release --example throughput
//! cargo run --release --example throughput -- --catchup-only # the reads alone
//! cargo run --release --example throughput -- --appends-only # store vs SQLite
//! ```
//!
//! `--appends-only` runs only `store_appends_per_s_500k` and SQLite's
//! figure for the same load, and their ratio: the write path of two builds
//! compared in a few seconds.
//!
//! `--catchup-only` runs only the million-event store's figures (catch-up,
//! decoding the records from memory, SQLite's scan) in a fresh process,
//! nothing before them: a comparison of two builds' read paths that the
//! allocator's history after the command runs cannot tilt.
//!
//! Without `--10m`, `open_ms_10m_events` is not printed and
//! `rss_bytes_per_stored_event` is measured while writing the million-event
//! store (`rss_stored_events` says which): sled's 64 MiB cache is then a
//! larger share of the figure than it is at ten million.
//!
//! The latency figure is taken the way a service sees load: commands
//! arrive on a fixed schedule whatever the answers do (open loop), over
//! 10,000 live aggregates, on a fresh store and runtime for each run (an
//! overloaded run leaves sled work that the next would pay for); the first
//! quarter of each run is a warm-up and is not measured; each latency runs
//! from the command's due time to its answer. The rate is half the
//! closed-loop maximum when the runtime keeps up with it (achieves 95% of
//! it, no command fails, the median latency stays under a twentieth of the
//! run). When it does not, the output says so, the rate
//! steps down by a fifth until one is kept up with, and the figure is taken
//! at half of that open-loop maximum. `latency_offered_per_s` and
//! `latency_achieved_per_s` say which rate the percentiles belong to.
//!
//! Prints one `name: value` line per figure (for scripts), then a summary
//! against the targets. Every store is fresh, in the system's temp dir, and
//! uses the default durability (fdatasync before acknowledging) unless said
//! otherwise. The scale multiplies every duration and count; the names of
//! the lines stay the same, and `open_events` / `rss_live_aggregates` say
//! what was actually measured.

#[path = "common/mod.rs"]
mod common;
#[path = "baselines/records.rs"]
mod records;
#[path = "baselines/sqlite.rs"]
mod sqlite;

use std::collections::HashMap;
use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::codec::{encode_event, encode_value};
use annals::store::{
    Durability, EventFilter, ReadDirection, SledStoreConfig, Snapshot, StoreStats,
};
use annals::{
    EventStore, ExpectedVersion, NewEvent, Position, ProjectionConfig, ProjectionHandle, Runtime,
    RuntimeConfig, SledStore, StreamId, Version,
};

use common::{increment, percentile, Counter, CounterEvent};

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

/// Concurrent aggregates of the three command figures.
const AGGREGATE_COUNTS: [usize; 3] = [1, 100, 10_000];
/// The stream lengths of the recovery figures.
const LOAD_EVENTS: [u64; 3] = [1_000, 10_000, 100_000];
/// The snapshot interval of the recovery figures (the runtime's default).
const SNAPSHOT_EVERY: u64 = 100;
/// How far behind the head the recovered snapshot is: fewer than
/// `SNAPSHOT_EVERY` events, as the runtime leaves it.
const SNAPSHOT_TAIL: u64 = 50;

/// How often the open-loop sender sends the commands that have come due.
const ISSUE_TICK: Duration = Duration::from_micros(200);
/// An open-loop run keeps up only if it achieves this share of its offered
/// rate.
const SUSTAINED: f64 = 0.95;
/// Without `/proc`, resident memory cannot be read: the run stops rather
/// than print a figure of 0 that would pass its target.
const NO_PROC: &str = "no /proc/self/status: resident memory cannot be measured";

/// How long and how big each part runs.
struct Scale {
    factor: f64,
    /// Each command figure, the raw limit, and the latency run.
    run: Duration,
    /// Events in the store that is opened and caught up on.
    open_events: u64,
    /// Live idle aggregates for the memory figure.
    live_aggregates: usize,
    /// Recoveries timed per stream length and kind (the median is printed).
    load_rounds: usize,
    /// Events the store-append figures (sled, SQLite) write.
    store_events: u64,
    /// Events of the opening and memory figures' big store (`--10m`).
    huge_events: Option<u64>,
}

impl Scale {
    fn from_env() -> Result<Self> {
        let quick = std::env::args().any(|a| a == "--quick");
        let factor = match std::env::var("ANNALS_THROUGHPUT_SCALE") {
            Ok(value) => value
                .parse::<f64>()
                .map_err(|e| format!("ANNALS_THROUGHPUT_SCALE={value}: {e}"))?,
            Err(_) if quick => 0.1,
            Err(_) => 1.0,
        };
        if !(factor > 0.0 && factor <= 20.0) {
            return Err(format!("the scale must be in (0, 20], not {factor}").into());
        }
        Ok(Self {
            factor,
            run: Duration::from_secs_f64((4.0 * factor).max(0.5)),
            open_events: ((1_000_000.0 * factor) as u64).max(10_000),
            live_aggregates: ((100_000.0 * factor) as usize).max(1_000),
            load_rounds: ((7.0 * factor).round() as usize).clamp(3, 15),
            store_events: ((500_000.0 * factor) as u64).max(20_000),
            huge_events: std::env::args().any(|a| a == "--10m").then_some(10_000_000),
        })
    }
}

fn open_store(path: &Path, durability: Durability) -> Result<Arc<SledStore>> {
    Ok(Arc::new(SledStore::open_with(
        SledStoreConfig::new(path).durability(durability),
    )?))
}

fn stats_since(before: StoreStats, after: StoreStats) -> (u64, u64) {
    (
        after.appends - before.appends,
        after.group_commits - before.group_commits,
    )
}

// ---------------------------------------------------------------------------
// Commands through the runtime.

/// What one command figure measured, and the runtime it ran on (kept for
/// the latency run).
struct CommandRun {
    per_second: f64,
    /// Appends per group commit while measuring.
    appends_per_commit: f64,
    runtime: Runtime<SledStore>,
    _dir: tempfile::TempDir,
}

/// A runtime on a fresh durable store with `aggregates` live aggregates,
/// each with one command done.
async fn warm_runtime(
    aggregates: usize,
) -> Result<(Runtime<SledStore>, Arc<SledStore>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let store = open_store(&dir.path().join("store"), Durability::Fsync)?;
    let config = RuntimeConfig::builder()
        .max_live_aggregates(aggregates.max(100_000) * 2)
        .build()
        .unwrap();
    let runtime = Runtime::new(store.clone(), config);
    let counters = runtime.aggregates::<Counter>();
    let warm_up: Vec<_> = (0..aggregates)
        .map(|n| {
            let counters = counters.clone();
            tokio::spawn(async move { counters.execute(&n.to_string(), increment()).await })
        })
        .collect();
    for task in warm_up {
        task.await??;
    }
    Ok((runtime, store, dir))
}

/// One open-loop run on a fresh runtime and store: a run that overloaded
/// the store leaves work behind (sled's own flushing of what it wrote), and
/// measured on the same store the next run paid for it.
async fn fresh_open_loop(
    aggregates: usize,
    rate: f64,
    warm_up: Duration,
    run: Duration,
) -> Result<OpenLoop> {
    let (runtime, _store, _dir) = warm_runtime(aggregates).await?;
    let measured = open_loop(&runtime, aggregates, rate, warm_up, run).await?;
    runtime.shutdown().await?;
    Ok(measured)
}

/// `aggregates` tasks, each sending one-event commands to its own aggregate
/// one after another, for `run`; every aggregate is live before the clock
/// starts.
async fn commands(aggregates: usize, run: Duration) -> Result<CommandRun> {
    let (runtime, store, dir) = warm_runtime(aggregates).await?;
    let counters = runtime.aggregates::<Counter>();

    let before = store.stats();
    let start = Instant::now();
    let deadline = start + run;
    let tasks: Vec<_> = (0..aggregates)
        .map(|n| {
            let counters = counters.clone();
            tokio::spawn(async move {
                let id = n.to_string();
                let mut done = 0u64;
                while Instant::now() < deadline {
                    counters.execute(&id, increment()).await?;
                    done += 1;
                }
                Ok::<u64, annals::CommandError<common::CounterError>>(done)
            })
        })
        .collect();
    let mut done = 0;
    for task in tasks {
        done += task.await??;
    }
    let elapsed = start.elapsed();
    let (appends, commits) = stats_since(before, store.stats());
    Ok(CommandRun {
        per_second: done as f64 / elapsed.as_secs_f64(),
        appends_per_commit: appends as f64 / commits.max(1) as f64,
        runtime,
        _dir: dir,
    })
}

/// What one open-loop run measured.
struct OpenLoop {
    /// Commands per second asked for.
    offered: f64,
    /// Measured commands over the time from the window's start to the last
    /// one's answer: below `offered` when commands queued up.
    achieved: f64,
    /// Latencies of the measured commands, sorted (a failed command's runs
    /// to its failure).
    latencies: Vec<Duration>,
    /// Measured commands that failed (timed out, overloaded).
    failed: usize,
    /// How long the measured part lasted.
    window: Duration,
}

impl OpenLoop {
    /// The runtime kept up: no command failed, the answers did not run
    /// late past the window (which would push the achieved rate down), and
    /// no backlog built up during the warm-up either (which the achieved
    /// rate alone misses when it drains by the window's end): the median
    /// latency is under a twentieth of the window.
    fn sustained(&self) -> bool {
        self.failed == 0
            && self.achieved >= SUSTAINED * self.offered
            && percentile(&self.latencies, 0.5) <= self.window / 20
    }
}

/// Open-loop load: command `n` is due at `start + n / rate`, whether or not
/// earlier ones have finished, round-robin over `aggregates` live
/// aggregates. A plain thread wakes every `ISSUE_TICK` and hands the
/// commands that have come due to the runtime in one task, which spawns one
/// task per command, as a server would per request: so sending is not
/// bunched into the async timer's millisecond ticks, and the sender does not
/// pay a thread wake-up per command (on 2 cores that would be a large part
/// of what is measured). Each latency runs from the command's due time, not
/// from when it was sent, so that a stall of the sender or of the runtime is
/// counted rather than hidden by sending less during it (coordinated
/// omission). The commands of the first `warm_up` are not measured.
async fn open_loop(
    runtime: &Runtime<SledStore>,
    aggregates: usize,
    rate: f64,
    warm_up: Duration,
    run: Duration,
) -> Result<OpenLoop> {
    let counters = runtime.aggregates::<Counter>();
    let skipped = (rate * warm_up.as_secs_f64()) as u64;
    let total = skipped + (rate * run.as_secs_f64()).max(1.0) as u64;
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
    let tokio = tokio::runtime::Handle::current();
    let start = Instant::now();
    let due = move |n: u64| start + Duration::from_secs_f64(n as f64 / rate);
    let sender = tokio::task::spawn_blocking(move || {
        let mut issued = 0;
        while issued < total {
            let elapsed = start.elapsed().as_secs_f64();
            let now_due = ((elapsed * rate) as u64 + 1).min(total);
            if now_due > issued {
                let (counters, answers) = (counters.clone(), answers.clone());
                let batch = issued..now_due;
                tokio.spawn(async move {
                    for n in batch {
                        let (counters, answers) = (counters.clone(), answers.clone());
                        tokio::spawn(async move {
                            let id = (n as usize % aggregates).to_string();
                            let ok = counters.execute(&id, increment()).await.is_ok();
                            let _ = answers.send((n, Instant::now(), ok));
                        });
                    }
                });
                issued = now_due;
            }
            std::thread::sleep(ISSUE_TICK);
        }
    });
    let window_start = due(skipped);
    let mut latencies = Vec::with_capacity((total - skipped) as usize);
    let mut failed = 0;
    let mut last_answer = window_start;
    for _ in 0..total {
        let (n, at, ok) = answered.recv().await.ok_or("a command task vanished")?;
        if n >= skipped {
            latencies.push(at - due(n));
            failed += usize::from(!ok);
            last_answer = last_answer.max(at);
        }
    }
    sender.await?;
    latencies.sort();
    let span = (last_answer - window_start).max(run);
    Ok(OpenLoop {
        offered: rate,
        achieved: latencies.len() as f64 / span.as_secs_f64(),
        latencies,
        failed,
        window: run,
    })
}

/// The open-loop runs behind the latency figure.
struct Latency {
    /// At half the closed-loop maximum.
    half_max: OpenLoop,
    /// When that was not sustained: the rates tried below it, the last one
    /// sustained if any was.
    steps: Vec<OpenLoop>,
    /// At half the highest sustained rate of `steps`.
    half_open_loop_max: Option<OpenLoop>,
}

impl Latency {
    /// The run whose latencies are the figure.
    fn reported(&self) -> &OpenLoop {
        self.half_open_loop_max.as_ref().unwrap_or(&self.half_max)
    }

    /// The highest open-loop rate found sustained, when stepping down.
    fn open_loop_max(&self) -> Option<f64> {
        self.half_open_loop_max.as_ref()?;
        self.steps.last().map(|run| run.offered)
    }
}

/// The latency figure of issue 5, "at about half of the maximum rate":
/// first at half the closed-loop maximum. If that is not sustained (the
/// closed loop batches thousands of appends per group commit, an open loop
/// at a lower rate far fewer, so its ceiling can be lower), the offered
/// rate steps down by a fifth (shorter runs) until one is: that is the
/// open-loop maximum found, and the figure is measured again at half of it.
async fn latency_at_half_max(
    aggregates: usize,
    closed_loop_max: f64,
    scale: &Scale,
) -> Result<Latency> {
    let warm_up = scale.run / 4;
    let mut rate = closed_loop_max / 2.0;
    let half_max = fresh_open_loop(aggregates, rate, warm_up, scale.run).await?;
    let mut latency = Latency {
        steps: Vec::new(),
        half_open_loop_max: None,
        half_max,
    };
    if latency.half_max.sustained() {
        return Ok(latency);
    }
    for _ in 0..6 {
        rate *= 0.8;
        let step = fresh_open_loop(aggregates, rate, warm_up, scale.run / 2).await?;
        let sustained = step.sustained();
        latency.steps.push(step);
        if sustained {
            let half = fresh_open_loop(aggregates, rate / 2.0, warm_up, scale.run).await?;
            latency.half_open_loop_max = Some(half);
            break;
        }
    }
    Ok(latency)
}

// ---------------------------------------------------------------------------
// The store alone, and the SQLite baseline under the same load.

/// Concurrent appenders of the store figures.
const APPENDERS: usize = 1_024;
/// Streams they append to.
const APPEND_STREAMS: usize = 10_000;

/// What one store-append run measured.
struct Appends {
    per_second: f64,
    /// Appends per group commit (fdatasync).
    per_commit: f64,
}

/// `APPENDERS` tasks append single counter events (ids time-ordered, as
/// `NewEvent` makes them) to `APPEND_STREAMS` streams with
/// `ExpectedVersion::Any`, until `events` are stored, to a fresh durable
/// sled store.
async fn sled_appends(events: u64) -> Result<Appends> {
    let dir = tempfile::tempdir()?;
    let store = open_store(&dir.path().join("store"), Durability::Fsync)?;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let streams: Arc<Vec<StreamId>> = Arc::new(
        (0..APPEND_STREAMS)
            .map(|n| StreamId::new(format!("counter-{n}")))
            .collect::<Result<_, _>>()?,
    );
    let before = store.stats();
    let start = Instant::now();
    let tasks: Vec<_> = (0..APPENDERS)
        .map(|_| {
            let (store, next, streams) = (store.clone(), next.clone(), streams.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= events {
                        return Ok::<(), Box<dyn Error + Send + Sync>>(());
                    }
                    let event = encode_event(&CounterEvent::Incremented { by: 1 })?;
                    let stream = &streams[n as usize % APPEND_STREAMS];
                    store
                        .append(stream, ExpectedVersion::Any, vec![event])
                        .await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = start.elapsed();
    let (appends, commits) = stats_since(before, store.stats());
    assert_eq!(store.head_position(), Position(events));
    store.shutdown().await?;
    Ok(Appends {
        per_second: events as f64 / elapsed.as_secs_f64(),
        per_commit: appends as f64 / commits.max(1) as f64,
    })
}

/// The same load as [`sled_appends`], on the SQLite baseline.
async fn sqlite_appends(events: u64) -> Result<Appends> {
    let dir = tempfile::tempdir()?;
    let (sqlite, writer) = sqlite::SqliteStore::open(&dir.path().join("events.db"))?;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let streams: Arc<Vec<String>> = Arc::new(
        (0..APPEND_STREAMS)
            .map(|n| format!("counter-{n}"))
            .collect(),
    );
    let start = Instant::now();
    let tasks: Vec<_> = (0..APPENDERS)
        .map(|_| {
            let (sqlite, next, streams) = (sqlite.clone(), next.clone(), streams.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= events {
                        return Ok::<(), Box<dyn Error + Send + Sync>>(());
                    }
                    let event = encode_event(&CounterEvent::Incremented { by: 1 })?;
                    let event = sqlite::SqlEvent {
                        event_id: event.event_id,
                        event_type: event.event_type,
                        payload: event.payload,
                    };
                    let stream = &streams[n as usize % APPEND_STREAMS];
                    sqlite
                        .append(stream, sqlite::Expected::Any, vec![event])
                        .await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = start.elapsed();
    drop(sqlite);
    let commits = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| "the SQLite writer panicked")??;
    Ok(Appends {
        per_second: events as f64 / elapsed.as_secs_f64(),
        per_commit: events as f64 / commits.max(1) as f64,
    })
}

// ---------------------------------------------------------------------------
// Recovery.

/// Appends `events` increments to `counter-{id}` in appends of 1,000.
async fn write_stream(store: &SledStore, id: &str, events: u64) -> Result<()> {
    let stream = StreamId::new(format!("counter-{id}"))?;
    let mut written = 0;
    while written < events {
        let n = (events - written).min(1000);
        let batch = (0..n)
            .map(|_| encode_event(&CounterEvent::Incremented { by: 1 }))
            .collect::<Result<Vec<NewEvent>, _>>()?;
        store.append(&stream, ExpectedVersion::Any, batch).await?;
        written += n;
    }
    Ok(())
}

/// One timed recovery: the store at `path` freshly opened (sled's cache
/// cold, the files in the OS's page cache), a fresh runtime on it, and
/// `state(id)` on the aggregate, which spawns its actor and runs its
/// `pre_start` (snapshot, then the events after it) before answering. The
/// runtime's supervisor is started first with another, empty aggregate, so
/// that only this aggregate's recovery is timed.
async fn time_recovery(
    path: &Path,
    id: &str,
    events: u64,
    snapshot_every: u64,
) -> Result<Duration> {
    let store = open_store(path, Durability::Fsync)?;
    let config = RuntimeConfig::builder()
        .snapshot_every(snapshot_every)
        .build()
        .unwrap();
    let runtime = Runtime::new(store, config);
    let counters = runtime.aggregates::<Counter>();
    counters.state("empty").await?;
    let start = Instant::now();
    let state = counters.state(id).await?;
    let elapsed = start.elapsed();
    assert_eq!(state.count, events, "recovered the whole stream");
    runtime.shutdown().await?;
    Ok(elapsed)
}

/// The median of `rounds` [`time_recovery`]s, in µs.
async fn median_recovery(
    path: &Path,
    id: &str,
    events: u64,
    snapshot_every: u64,
    rounds: usize,
) -> Result<f64> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        times.push(time_recovery(path, id, events, snapshot_every).await?);
    }
    times.sort();
    Ok(percentile(&times, 0.5).as_secs_f64() * 1e6)
}

/// What one stream length took to recover, median µs.
struct Load {
    events: u64,
    no_snapshot_us: f64,
    with_snapshot_us: f64,
}

/// Recovery of one aggregate after a restart, for each of `LOAD_EVENTS`
/// stream lengths: replaying the whole stream (no snapshot, snapshots off so
/// that the first recovery does not leave one behind), and from a snapshot
/// `SNAPSHOT_TAIL` events behind the head (as the default `snapshot_every`
/// of 100 leaves it on average). Median of `rounds` recoveries, each on a
/// freshly reopened store.
async fn loads(rounds: usize) -> Result<Vec<Load>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = open_store(&path, Durability::Fsync)?;
    for events in LOAD_EVENTS {
        write_stream(&store, &format!("plain-{events}"), events).await?;
        let id = format!("snapshotted-{events}");
        write_stream(&store, &id, events).await?;
        // The state at the snapshot's version, as the actor would have
        // encoded it there.
        let version = Version(events - SNAPSHOT_TAIL);
        let runtime = Runtime::new(
            store.clone(),
            RuntimeConfig::builder().snapshot_every(0).build().unwrap(),
        );
        let state = runtime
            .aggregates::<Counter>()
            .state_at(&id, version)
            .await?;
        let payload = encode_value(&state)?;
        let stream = StreamId::new(format!("counter-{id}"))?;
        store
            .save_snapshot(&stream, Snapshot { version, payload })
            .await?;
    }
    store.shutdown().await?;
    drop(store);

    let mut loads = Vec::new();
    for events in LOAD_EVENTS {
        let plain = format!("plain-{events}");
        let snapshotted = format!("snapshotted-{events}");
        loads.push(Load {
            events,
            no_snapshot_us: median_recovery(&path, &plain, events, 0, rounds).await?,
            with_snapshot_us: median_recovery(&path, &snapshotted, events, SNAPSHOT_EVERY, rounds)
                .await?,
        });
    }
    Ok(loads)
}

// ---------------------------------------------------------------------------
// A store of a million events: opening, catching up, scanning.

struct BigStore {
    open_ms: f64,
    catchup_per_s: f64,
    /// The same events, encoded as the store stores them.
    records: Vec<Vec<u8>>,
    /// Resident bytes the filling process grew by, per event written.
    rss_per_event: f64,
}

/// The median of three opens of the store at `path`, in ms.
async fn open_ms(path: &Path) -> Result<f64> {
    let mut opens = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let store = SledStore::open(path)?;
        opens.push(start.elapsed());
        store.shutdown().await?;
    }
    opens.sort();
    Ok(percentile(&opens, 0.5).as_secs_f64() * 1e3)
}

/// Every event of the store, encoded again as it is stored (an untimed
/// read, which also puts the files in the page cache for the timed one).
async fn stored_records(store: &SledStore) -> Result<Vec<Vec<u8>>> {
    let mut records = Vec::with_capacity(store.head_position().0 as usize);
    let mut from = Position(1);
    loop {
        let page = store
            .read_all(from, ReadDirection::Forward, 10_000, &EventFilter::All)
            .await?;
        let Some(last) = page.last() else { break };
        from = Position(last.position.0 + 1);
        for event in &page {
            records.push(records::encode(event)?);
        }
    }
    Ok(records)
}

async fn big_store(events: u64) -> Result<BigStore> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let rss_per_event = common::fill_bulk(&path, events).await?.ok_or(NO_PROC)?;
    let open_ms = open_ms(&path).await?;

    let store = open_store(&path, Durability::Fsync)?;
    let head = store.head_position();
    assert_eq!(head, Position(events));
    let records = stored_records(&store).await?;
    assert_eq!(records.len() as u64, events);
    let start = Instant::now();
    let projection = ProjectionHandle::spawn(
        store.clone(),
        ProjectionConfig::builder("throughput-catchup").build()?,
        common::StreamCounts(HashMap::new()),
    )
    .await?;
    projection.wait_for(head, Duration::from_secs(600)).await?;
    let catchup_per_s = events as f64 / start.elapsed().as_secs_f64();
    projection.shutdown().await?;
    store.shutdown().await?;
    Ok(BigStore {
        open_ms,
        catchup_per_s,
        records,
        rss_per_event,
    })
}

/// The opening time and memory figures on a store of `events` (the
/// `--10m` run).
async fn huge_store(events: u64) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let rss_per_event = common::fill_bulk(&path, events).await?.ok_or(NO_PROC)?;
    Ok((open_ms(&path).await?, rss_per_event))
}

/// SQLite's scan of the same events: a table filled as the bulk store is
/// (untimed), then read whole in position order into owned
/// `RecordedEvent`s, twice; the second (warm, as the sled figures are) is
/// timed. Events/s.
fn sqlite_scan(events: u64) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("events.db");
    let event = encode_event(&CounterEvent::Incremented { by: 1 })?;
    sqlite::fill_bulk(&path, events, &event.event_type, &event.payload)?;
    assert_eq!(sqlite::scan(&path)?, events);
    let start = Instant::now();
    let scanned = sqlite::scan(&path)?;
    let per_s = scanned as f64 / start.elapsed().as_secs_f64();
    assert_eq!(scanned, events);
    Ok(per_s)
}

// ---------------------------------------------------------------------------
// Memory.

/// Resident bytes per live idle aggregate: RSS before and after making
/// `count` aggregates live (`state()` starts each actor without writing).
async fn rss_per_aggregate(count: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let store = open_store(&dir.path().join("store"), Durability::Fsync)?;
    let config = RuntimeConfig::builder()
        .max_live_aggregates(count * 2)
        .idle_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let runtime = Runtime::new(store, config);
    let counters = runtime.aggregates::<Counter>();
    // The supervisor and the first actor's one-off allocations come first.
    counters.state("warm").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = common::rss_bytes().ok_or("no /proc/self/status")?;
    for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|n| {
                let counters = counters.clone();
                let id = n.to_string();
                tokio::spawn(async move { counters.state(&id).await })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = common::rss_bytes().ok_or("no /proc/self/status")?;
    assert_eq!(
        runtime.live_aggregates(),
        count + 1,
        "all live, none evicted"
    );
    runtime.shutdown().await?;
    Ok(after.saturating_sub(before) as f64 / count as f64)
}

// ---------------------------------------------------------------------------

/// Today's `commands_per_s_10000` in issue 14 (a 2-core machine of this
/// project, format 2): the target is twice it.
const ISSUE_14_COMMANDS_10000: f64 = 47_900.0;

/// The `--catchup-only` run: the big store's read figures alone.
async fn catchup_only(scale: &Scale) -> Result<()> {
    let store = big_store(scale.open_events).await?;
    let decode_per_s = records::decode_rate(&store.records)?;
    drop(store.records);
    let events = scale.open_events;
    let sqlite_scan_per_s = tokio::task::spawn_blocking(move || sqlite_scan(events)).await??;
    println!("catchup_events_per_s: {:.0}", store.catchup_per_s);
    println!("decode_events_per_s: {decode_per_s:.0}");
    println!("ratio_to_decode: {:.2}", store.catchup_per_s / decode_per_s);
    println!("sqlite_scan_events_per_s: {sqlite_scan_per_s:.0}");
    println!(
        "ratio_to_sqlite_scan: {:.2}",
        store.catchup_per_s / sqlite_scan_per_s
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let scale = Scale::from_env()?;
    let started = Instant::now();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("cpus: {cpus}");
    println!("load_average_1min_at_start: {}", common::load_average());
    println!("scale: {}", scale.factor);

    if std::env::args().any(|a| a == "--catchup-only") {
        return catchup_only(&scale).await;
    }
    if std::env::args().any(|a| a == "--appends-only") {
        let sled = sled_appends(scale.store_events).await?;
        let sqlite = sqlite_appends(scale.store_events).await?;
        println!("store_appends_per_s_500k: {:.0}", sled.per_second);
        println!("store_appends_per_group_commit: {:.1}", sled.per_commit);
        println!("sqlite_appends_per_s_500k: {:.0}", sqlite.per_second);
        println!(
            "ratio_to_sqlite_appends: {:.2}",
            sled.per_second / sqlite.per_second
        );
        return Ok(());
    }

    // Memory first, while the allocator has no freed memory to reuse.
    let rss = rss_per_aggregate(scale.live_aggregates).await?;

    let mut rates = Vec::new();
    let mut last = None;
    for aggregates in AGGREGATE_COUNTS {
        let run = commands(aggregates, scale.run).await?;
        rates.push((aggregates, run.per_second, run.appends_per_commit));
        if let Some(previous) = last.replace(run) {
            previous.runtime.shutdown().await?;
        }
    }
    let big = last.ok_or("no command run")?;
    let (_, commands_10000, appends_per_commit) = rates[2];
    big.runtime.shutdown().await?;
    drop(big);

    // The store alone and SQLite, the same load, one after the other.
    let sled = sled_appends(scale.store_events).await?;
    let sqlite = sqlite_appends(scale.store_events).await?;

    let latency = latency_at_half_max(AGGREGATE_COUNTS[2], commands_10000, &scale).await?;

    let loads = loads(scale.load_rounds).await?;
    let store = big_store(scale.open_events).await?;
    let decode_per_s = records::decode_rate(&store.records)?;
    let group = appends_per_commit.round().max(1.0) as usize;
    let log_dir = tempfile::tempdir()?;
    let file_log = records::file_log(
        &log_dir.path().join("log"),
        &store.records,
        group,
        scale.run,
    )?;
    // The fdatasync a lone command waits for: one record per sync.
    let lone = records::file_log(
        &log_dir.path().join("lone"),
        &store.records,
        1,
        (scale.run / 4).max(Duration::from_millis(500)),
    )?;
    drop(log_dir);
    let open_events = scale.open_events;
    drop(store.records);
    let sqlite_scan_per_s = tokio::task::spawn_blocking(move || sqlite_scan(open_events)).await??;
    let huge = match scale.huge_events {
        Some(events) => Some((events, huge_store(events).await?)),
        None => None,
    };

    let half_max = &latency.half_max;
    let reported = latency.reported();
    let open_loop_max = latency.open_loop_max();
    let lat = &reported.latencies;
    let p50 = percentile(lat, 0.50).as_micros();
    let p99 = percentile(lat, 0.99).as_micros();
    let p999 = percentile(lat, 0.999).as_micros();
    let fdatasync_us = lone.fdatasync.as_secs_f64() * 1e6;
    let ratio_sqlite_appends = sled.per_second / sqlite.per_second;
    let ratio_sqlite_scan = store.catchup_per_s / sqlite_scan_per_s;
    let ratio_decode = store.catchup_per_s / decode_per_s;
    let ratio_file_log = commands_10000 / file_log.events_per_s;
    for (aggregates, rate, per_commit) in &rates {
        println!("commands_per_s_{aggregates}: {rate:.0}");
        println!("appends_per_group_commit_{aggregates}: {per_commit:.1}");
    }
    println!("store_appends_events: {}", scale.store_events);
    println!("store_appends_per_s_500k: {:.0}", sled.per_second);
    println!("store_appends_per_group_commit: {:.1}", sled.per_commit);
    println!("sqlite_appends_per_s_500k: {:.0}", sqlite.per_second);
    println!("sqlite_appends_per_commit: {:.1}", sqlite.per_commit);
    println!("ratio_to_sqlite_appends: {ratio_sqlite_appends:.2}");
    println!("file_log_limit_events_per_s: {:.0}", file_log.events_per_s);
    println!("file_log_limit_group_events: {group}");
    println!("file_log_limit_groups: {}", file_log.groups);
    println!("ratio_to_file_log_limit: {ratio_file_log:.2}");
    println!("fdatasync_us: {fdatasync_us:.0}");
    println!("fdatasync_lone_events_per_s: {:.0}", lone.events_per_s);
    println!("latency_half_max_per_s: {:.0}", half_max.offered);
    println!("latency_half_max_achieved_per_s: {:.0}", half_max.achieved);
    println!("latency_half_max_sustained: {}", half_max.sustained());
    if let Some(max) = open_loop_max {
        println!("latency_open_loop_max_per_s: {max:.0}");
    }
    println!("latency_offered_per_s: {:.0}", reported.offered);
    println!("latency_achieved_per_s: {:.0}", reported.achieved);
    println!("latency_failed_commands: {}", reported.failed);
    println!("p50_latency_us: {p50}");
    println!("p99_latency_us: {p99}");
    println!("p999_latency_us: {p999}");
    println!("catchup_events_per_s: {:.0}", store.catchup_per_s);
    println!("sqlite_scan_events_per_s: {sqlite_scan_per_s:.0}");
    println!("ratio_to_sqlite_scan: {ratio_sqlite_scan:.2}");
    println!("decode_events_per_s: {decode_per_s:.0}");
    println!("ratio_to_decode: {ratio_decode:.2}");
    for load in &loads {
        let events = load.events;
        println!(
            "load_{events}_events_no_snapshot_us: {:.0}",
            load.no_snapshot_us
        );
        println!(
            "load_{events}_events_with_snapshot_us: {:.0}",
            load.with_snapshot_us
        );
    }
    println!("load_snapshot_tail_events: {SNAPSHOT_TAIL}");
    println!("rss_live_aggregates: {}", scale.live_aggregates);
    println!("rss_bytes_per_live_aggregate: {rss:.0}");
    println!("open_events: {open_events}");
    println!("open_ms_1m_events: {:.1}", store.open_ms);
    let (rss_events, rss_per_event) = match huge {
        Some((events, (open_ms, rss_per_event))) => {
            println!("open_ms_10m_events: {open_ms:.1}");
            (events, rss_per_event)
        }
        None => (open_events, store.rss_per_event),
    };
    println!("rss_stored_events: {rss_events}");
    println!("rss_bytes_per_stored_event: {rss_per_event:.1}");
    println!("total_run_s: {:.1}", started.elapsed().as_secs_f64());

    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!();
    println!("Summary ({cpus} cpus; every append and command is durable; targets of issue 14):");
    println!(
        "- The store alone, {APPENDERS} appenders over {APPEND_STREAMS} streams until {} events: \
         {:.0}/s ({:.1} per fdatasync); SQLite under the same load {:.0}/s ({:.1} per commit); \
         ratio {ratio_sqlite_appends:.2} ({} of 1.0).",
        scale.store_events,
        sled.per_second,
        sled.per_commit,
        sqlite.per_second,
        sqlite.per_commit,
        verdict(ratio_sqlite_appends >= 1.0)
    );
    println!(
        "- {commands_10000:.0} commands/s with 10,000 aggregates ({} of {:.0}, twice issue 14's \
         {ISSUE_14_COMMANDS_10000:.0}; compare with the old build in the same window), {:.0} with \
         100, {:.0} with 1.",
        verdict(commands_10000 >= 2.0 * ISSUE_14_COMMANDS_10000),
        2.0 * ISSUE_14_COMMANDS_10000,
        rates[1].1,
        rates[0].1
    );
    println!(
        "- The same records to a plain file, {group} per write + fdatasync, one thread: {:.0}/s; \
         the runtime reaches {ratio_file_log:.2} of it ({} of 0.3).",
        file_log.events_per_s,
        verdict(ratio_file_log >= 0.3)
    );
    let rate_rule = match open_loop_max {
        None if half_max.sustained() => "half the closed-loop maximum".to_owned(),
        None => format!(
            "half the closed-loop maximum, NOT sustained, and none of {} lower rates was",
            latency.steps.len()
        ),
        Some(max) => format!(
            "half of {max:.0}, the highest open-loop rate sustained; half the closed-loop \
             maximum, {:.0}, was not: {:.0} achieved, p50 {} µs",
            half_max.offered,
            half_max.achieved,
            percentile(&half_max.latencies, 0.5).as_micros()
        ),
    };
    println!(
        "- Open loop at {:.0} commands/s offered ({rate_rule}), {:.0} achieved: p50 {p50} µs, \
         p99 {p99} µs ({} of 5 x the median fdatasync, {fdatasync_us:.0} µs), p99.9 {p999} µs.",
        reported.offered,
        reported.achieved,
        verdict(p99 as f64 <= 5.0 * fdatasync_us)
    );
    println!(
        "- A projection catches up at {:.0} events/s ({} of 2,000,000); SQLite scans the same \
         number into owned events at {sqlite_scan_per_s:.0}/s (ratio {ratio_sqlite_scan:.2}, {} \
         of 0.5); decoding the same records from memory {decode_per_s:.0}/s (ratio \
         {ratio_decode:.2}, {} of 0.5).",
        store.catchup_per_s,
        verdict(store.catchup_per_s >= 2_000_000.0),
        verdict(ratio_sqlite_scan >= 0.5),
        verdict(ratio_decode >= 0.5)
    );
    let (shortest, longest) = (&loads[0], &loads[loads.len() - 1]);
    let list = |us: fn(&Load) -> f64| {
        loads
            .iter()
            .map(|l| format!("{:.0} µs at {} events", us(l), l.events))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "- Recovering one aggregate after a restart, from a snapshot {SNAPSHOT_TAIL} events behind \
         the head: {} ({} of flat: at most twice the shortest stream's); replaying the whole \
         stream: {}.",
        list(|l| l.with_snapshot_us),
        verdict(longest.with_snapshot_us <= 2.0 * shortest.with_snapshot_us),
        list(|l| l.no_snapshot_us),
    );
    println!(
        "- {rss:.0} bytes per live idle aggregate with {} live ({} of 2,048).",
        scale.live_aggregates,
        verdict(rss <= 2048.0)
    );
    println!(
        "- Opening a store of {open_events} events: {:.1} ms ({} of 100).",
        store.open_ms,
        verdict(store.open_ms < 100.0)
    );
    match huge {
        Some((events, (open_ms, _))) => println!(
            "- Opening a store of {events} events: {open_ms:.1} ms ({} of 300).",
            verdict(open_ms < 300.0)
        ),
        None => println!(
            "- Opening a store of 10,000,000 events: not run (add --10m; it writes about 4 GB)."
        ),
    }
    println!(
        "- Resident memory grew {rss_per_event:.1} bytes per event while writing {rss_events} \
         events ({} of 10{}).",
        verdict(rss_per_event < 10.0),
        if huge.is_some() {
            ""
        } else {
            "; the target is for 10,000,000: add --10m"
        }
    );
    Ok(())
}
