//! The figures of issue 5, in one run: durable commands/s through the runtime
//! next to the ceiling of the design on this machine (the same records
//! written straight to sled by one thread in the same batch sizes with the
//! same durability), latency under an open-loop load at half the maximum
//! (below),
//! projection catch-up next to a plain sled scan, an aggregate's recovery
//! after a restart (streams of 1,000 to 100,000 events, replayed whole or
//! from a snapshot near the head), memory per live idle aggregate, and the
//! time to open a store of a million events.
//!
//! ```text
//! cargo run --release --example throughput            # about a minute
//! cargo run --release --example throughput -- --quick # a tenth of it
//! ANNALS_THROUGHPUT_SCALE=3 cargo run --release --example throughput
//! ```
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

use std::collections::HashMap;
use std::error::Error;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::codec::{encode_event, encode_value};
use annals::store::{Durability, SledStoreConfig, Snapshot, StoreStats};
use annals::{
    EventStore, ExpectedVersion, NewEvent, Position, ProjectionConfig, ProjectionHandle, Runtime,
    RuntimeConfig, SledStore, StreamId, Version,
};
use serde::Serialize;
use uuid::Uuid;

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
// The ceiling: the same records, straight to sled.

/// The event record exactly as the sled store encodes it (docs/design.md,
/// "Tree `log`"), so that the raw writer writes the same bytes.
#[derive(Serialize)]
struct StoredRecord<'a> {
    event_id: Uuid,
    stream: &'a str,
    version: u64,
    event_type: &'a str,
    schema_version: u16,
    recorded_at_micros: u64,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    extra: Vec<(&'a str, &'a str)>,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

/// One thread writes what the runtime's writer writes for `streams`
/// one-event commands (event, stream index and id index per event, then
/// `Mhead`), `batch` events per sled batch, each batch flushed by sled and
/// made durable with fdatasync of the `db` file, for `run`. Events/s.
fn raw_limit(path: &Path, streams: usize, batch: usize, run: Duration) -> Result<f64> {
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(64 << 20)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()?;
    let log = db.open_tree("log")?;
    let db_file = File::open(path.join("db"))?;
    let event = encode_event(&CounterEvent::Incremented { by: 1 })?;
    let names: Vec<String> = (0..streams).map(|n| format!("counter-{n}")).collect();
    let mut versions = vec![0u64; streams];
    let mut position = 0u64;
    let mut next_stream = 0usize;
    let start = Instant::now();
    while start.elapsed() < run {
        let mut sled_batch = sled::Batch::default();
        let recorded_at_micros = start.elapsed().as_micros() as u64;
        for _ in 0..batch {
            position += 1;
            let stream = next_stream;
            next_stream = (next_stream + 1) % streams;
            versions[stream] += 1;
            let event_id = Uuid::now_v7();
            let record = StoredRecord {
                event_id,
                stream: &names[stream],
                version: versions[stream],
                event_type: &event.event_type,
                schema_version: event.schema_version,
                recorded_at_micros,
                correlation_id: None,
                causation_id: None,
                extra: Vec::new(),
                payload: &event.payload,
            };
            let mut event_key = vec![b'E'];
            event_key.extend_from_slice(&position.to_be_bytes());
            sled_batch.insert(event_key, postcard::to_stdvec(&record)?);
            let mut stream_key = vec![b'S'];
            stream_key.extend_from_slice(names[stream].as_bytes());
            stream_key.push(0);
            stream_key.extend_from_slice(&versions[stream].to_be_bytes());
            sled_batch.insert(stream_key, &position.to_be_bytes());
            let mut id_key = vec![b'I'];
            id_key.extend_from_slice(event_id.as_bytes());
            sled_batch.insert(id_key, &position.to_be_bytes());
        }
        sled_batch.insert(&b"Mhead"[..], &position.to_be_bytes());
        log.apply_batch(sled_batch)?;
        db.flush()?;
        db_file.sync_data()?;
    }
    Ok(position as f64 / start.elapsed().as_secs_f64())
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

/// Plain sled on the shut-down store at `path`: every `E` record of the
/// log; the count and events/s.
fn raw_scan(path: &Path) -> Result<(u64, f64)> {
    let (count, took) = common::scan_log(path)?;
    Ok((count, count as f64 / took.as_secs_f64()))
}

struct BigStore {
    open_ms: f64,
    catchup_per_s: f64,
    raw_scan_per_s: f64,
}

async fn big_store(events: u64) -> Result<BigStore> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    common::fill_bulk(&path, events).await?;

    let mut opens = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let store = SledStore::open(&path)?;
        opens.push(start.elapsed());
        store.shutdown().await?;
    }
    opens.sort();
    let open_ms = percentile(&opens, 0.5).as_secs_f64() * 1e3;

    // Untimed: both timed reads then find the files in the page cache.
    raw_scan(&path)?;
    let store = Arc::new(common::open_when_free(
        SledStoreConfig::new(&path).durability(Durability::Fsync),
    )?);
    let head = store.head_position();
    assert_eq!(head, Position(events));
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
    let (scanned, raw_scan_per_s) = raw_scan(&path)?;
    assert_eq!(scanned, events);
    Ok(BigStore {
        open_ms,
        catchup_per_s,
        raw_scan_per_s,
    })
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

#[tokio::main]
async fn main() -> Result<()> {
    let scale = Scale::from_env()?;
    let started = Instant::now();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("cpus: {cpus}");
    println!("load_average_1min_at_start: {}", common::load_average());
    println!("scale: {}", scale.factor);

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

    let batch = appends_per_commit.round().max(1.0) as usize;
    let raw_dir = tempfile::tempdir()?;
    let raw_path = raw_dir.path().join("raw");
    let raw_run = scale.run;
    let raw = tokio::task::spawn_blocking(move || {
        raw_limit(&raw_path, AGGREGATE_COUNTS[2], batch, raw_run)
    })
    .await??;
    drop(raw_dir);

    big.runtime.shutdown().await?;
    drop(big);
    let latency = latency_at_half_max(AGGREGATE_COUNTS[2], commands_10000, &scale).await?;

    let loads = loads(scale.load_rounds).await?;
    let store = big_store(scale.open_events).await?;

    let half_max = &latency.half_max;
    let reported = latency.reported();
    let open_loop_max = latency.open_loop_max();
    let lat = &reported.latencies;
    let p50 = percentile(lat, 0.50).as_micros();
    let p99 = percentile(lat, 0.99).as_micros();
    let p999 = percentile(lat, 0.999).as_micros();
    let ratio = commands_10000 / raw;
    println!("raw_limit_events_per_s: {raw:.0}");
    println!("raw_limit_batch_events: {batch}");
    for (aggregates, rate, per_commit) in &rates {
        println!("commands_per_s_{aggregates}: {rate:.0}");
        println!("appends_per_group_commit_{aggregates}: {per_commit:.1}");
    }
    println!("ratio_to_raw_limit: {ratio:.2}");
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
    println!("raw_scan_events_per_s: {:.0}", store.raw_scan_per_s);
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
    println!("open_events: {}", scale.open_events);
    println!("open_ms_1m_events: {:.1}", store.open_ms);
    println!("total_run_s: {:.1}", started.elapsed().as_secs_f64());

    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!();
    println!("Summary ({cpus} cpus; every command is one durable event; targets of issue 5):");
    println!(
        "- {commands_10000:.0} commands/s with 10,000 aggregates ({} of 50,000), {:.0} with 100, \
         {:.0} with 1 (each waits for its own fdatasync).",
        verdict(commands_10000 >= 50_000.0),
        rates[1].1,
        rates[0].1
    );
    println!(
        "- The same records straight to sled, {batch} per batch, fdatasync each: {raw:.0}/s; \
         the runtime reaches {ratio:.2} of it ({} of 0.8).",
        verdict(ratio >= 0.8)
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
         p99 {p99} µs ({} of 2,000), p99.9 {p999} µs.",
        reported.offered,
        reported.achieved,
        verdict(p99 <= 2_000)
    );
    println!(
        "- A projection catches up at {:.0} events/s ({} of 1,000,000), {:.2} of a plain sled \
         scan ({:.0}/s; {} of 0.5).",
        store.catchup_per_s,
        verdict(store.catchup_per_s >= 1_000_000.0),
        store.catchup_per_s / store.raw_scan_per_s,
        store.raw_scan_per_s,
        verdict(store.catchup_per_s >= store.raw_scan_per_s / 2.0)
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
        "- Opening a store of {} events: {:.1} ms ({} of 100).",
        scale.open_events,
        store.open_ms,
        verdict(store.open_ms < 100.0)
    );
    Ok(())
}
