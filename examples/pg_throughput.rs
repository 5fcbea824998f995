//! Append throughput of the PostgreSQL store against the design most event
//! stores on PostgreSQL start from, on the same server in the same run.
//!
//! ```text
//! cargo run --release --example pg_throughput            # about 25 s
//! cargo run --release --example pg_throughput -- --quick # about 6 s
//! ```
//!
//! - `pg_appends_per_s_N`: N tasks append one event each to their own
//!   stream, one append after another, through one `PostgresStore` (its
//!   writer groups what is queued into one transaction); with the p50/p99
//!   latency of an append and the mean group size (appends per transaction).
//! - `seed_design_appends_per_s`: the seed design: an `events` table with
//!   `UNIQUE (stream_id, version)` and a `bigserial` position, each append
//!   its own transaction that reads `MAX(version)` of the stream and
//!   inserts, 8 concurrent clients, each on its own stream (no conflicts:
//!   its best case), `synchronous_commit = on`.
//! - `pg_ratio_to_seed_design`: `pg_appends_per_s_64` over the seed figure
//!   (target at least 3).
//! - `pg_commands_per_s_10000`: commands through the runtime on the
//!   PostgreSQL store, 10,000 live aggregates (one warm-up command each), one
//!   task per aggregate sending one command after another; with its ratio
//!   to the seed design's appends (`pg_commands_ratio_to_seed_design`).
//!
//! The server is `ANNALS_PG_URL` (default
//! `postgresql://postgres@127.0.0.1:5432/test`); each run uses fresh schemas
//! and drops them at the end.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::store::{PostgresConfig, PostgresStore};
use annals::{EventStore, ExpectedVersion, NewEvent, Runtime, RuntimeConfig, StreamId};
use tokio_postgres::NoTls;

#[path = "common/mod.rs"]
mod common;

use common::{increment, Counter};

const PAYLOAD_BYTES: usize = 100;
const APPENDERS: [usize; 3] = [1, 64, 1024];
const SEED_CLIENTS: usize = 8;

fn url() -> String {
    std::env::var("ANNALS_PG_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".to_owned())
}

fn percentile(sorted: &[Duration], fraction: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 * fraction) as usize).min(sorted.len() - 1);
    sorted[index].as_micros()
}

/// What one figure measured.
struct Figure {
    appends_per_s: f64,
    p50_us: u128,
    p99_us: u128,
    mean_group: f64,
}

async fn annals_figure(
    store: Arc<PostgresStore>,
    appenders: usize,
    run: Duration,
    round: usize,
) -> Result<Figure, Box<dyn Error>> {
    let before = store.stats();
    let started = Instant::now();
    let deadline = started + run;
    let mut tasks = Vec::with_capacity(appenders);
    for task in 0..appenders {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new(format!("bench{round}-{task}")).expect("stream id");
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let event = NewEvent::new("Noted", vec![7; PAYLOAD_BYTES]);
                let sent = Instant::now();
                store
                    .append(&stream, ExpectedVersion::Any, vec![event])
                    .await
                    .expect("append");
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let after = store.stats();
    let appends = after.appends - before.appends;
    let transactions = (after.transactions - before.transactions).max(1);
    Ok(Figure {
        appends_per_s: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        mean_group: appends as f64 / transactions as f64,
    })
}

/// Commands through the runtime: `aggregates` live aggregates, one task
/// each, for `run`. Returns commands/s and the mean group size.
async fn commands_figure(
    store: Arc<PostgresStore>,
    aggregates: usize,
    run: Duration,
) -> Result<(f64, f64), Box<dyn Error>> {
    let config = RuntimeConfig::builder()
        .max_live_aggregates(aggregates * 2)
        .build()?;
    let runtime = Runtime::new(Arc::clone(&store), config);
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
    let before = store.stats();
    let started = Instant::now();
    let deadline = started + run;
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
    let elapsed = started.elapsed();
    let after = store.stats();
    let groups = (after.transactions - before.transactions).max(1);
    runtime.shutdown().await?;
    Ok((
        done as f64 / elapsed.as_secs_f64(),
        (after.appends - before.appends) as f64 / groups as f64,
    ))
}

/// The seed design: MAX(version) then INSERT, one transaction per append.
async fn seed_figure(schema: &str, run: Duration) -> Result<Figure, Box<dyn Error>> {
    let (admin, connection) = tokio_postgres::connect(&url(), NoTls).await?;
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.events (
                 position bigserial PRIMARY KEY,
                 stream_id text NOT NULL,
                 version bigint NOT NULL,
                 event_type text NOT NULL,
                 payload bytea NOT NULL,
                 UNIQUE (stream_id, version));"
        ))
        .await?;
    let started = Instant::now();
    let deadline = started + run;
    let mut clients = Vec::new();
    for client_index in 0..SEED_CLIENTS {
        let schema = schema.to_owned();
        clients.push(tokio::spawn(async move {
            let (mut client, connection) = tokio_postgres::connect(&url(), NoTls)
                .await
                .expect("connect");
            tokio::spawn(connection);
            client
                .batch_execute("SET synchronous_commit = on")
                .await
                .expect("set");
            let stream = format!("seed-{client_index}");
            let select = format!(
                "SELECT coalesce(max(version), 0) FROM {schema}.events WHERE stream_id = $1"
            );
            let insert = format!(
                "INSERT INTO {schema}.events (stream_id, version, event_type, payload) \
                 VALUES ($1, $2, 'Noted', $3)"
            );
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                let transaction = client.transaction().await.expect("begin");
                let version: i64 = transaction
                    .query_one(&select, &[&stream])
                    .await
                    .expect("max")
                    .get(0);
                transaction
                    .execute(
                        &insert,
                        &[&stream, &(version + 1), &vec![7u8; PAYLOAD_BYTES]],
                    )
                    .await
                    .expect("insert");
                transaction.commit().await.expect("commit");
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await?);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Figure {
        appends_per_s: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        mean_group: 1.0,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let run = if quick {
        Duration::from_millis(1200)
    } else {
        Duration::from_secs(5)
    };
    let tag = std::process::id();
    let annals_schema = format!("annals_bench_{tag}");
    let seed_schema = format!("seed_bench_{tag}");

    let config = PostgresConfig::new(url()).schema(annals_schema.clone());
    let store = Arc::new(PostgresStore::open(config)?);
    let mut pg_64 = 0.0;
    for (round, appenders) in APPENDERS.into_iter().enumerate() {
        let figure = annals_figure(Arc::clone(&store), appenders, run, round).await?;
        println!("pg_appends_per_s_{appenders}: {:.0}", figure.appends_per_s);
        println!("pg_p50_latency_us_{appenders}: {}", figure.p50_us);
        println!("pg_p99_latency_us_{appenders}: {}", figure.p99_us);
        println!("pg_mean_batch_size_{appenders}: {:.1}", figure.mean_group);
        if appenders == 64 {
            pg_64 = figure.appends_per_s;
        }
    }
    store.shutdown().await?;

    // A fresh schema: the runtime's figure does not read the appenders' rows.
    let commands_schema = format!("annals_bench_commands_{tag}");
    let commands_store = Arc::new(PostgresStore::open(
        PostgresConfig::new(url()).schema(commands_schema.clone()),
    )?);
    let (commands_per_s, commands_group) = commands_figure(commands_store, 10_000, run).await?;
    println!("pg_commands_per_s_10000: {commands_per_s:.0}");
    println!("pg_commands_mean_batch_size_10000: {commands_group:.1}");

    let seed = seed_figure(&seed_schema, run).await?;
    println!("seed_design_appends_per_s: {:.0}", seed.appends_per_s);
    println!("seed_design_p50_latency_us: {}", seed.p50_us);
    println!("seed_design_p99_latency_us: {}", seed.p99_us);
    let ratio = pg_64 / seed.appends_per_s.max(1.0);
    println!("pg_ratio_to_seed_design: {ratio:.2}");
    println!(
        "pg_commands_ratio_to_seed_design: {:.2}",
        commands_per_s / seed.appends_per_s.max(1.0)
    );
    println!("load_average: {}", common::load_average());
    println!(
        "summary: {:.0} appends/s through PostgresStore with 64 appenders against {:.0} for the \
         seed design with 8 clients: {ratio:.2}x (target 3x)",
        pg_64, seed.appends_per_s
    );

    let (admin, connection) = tokio_postgres::connect(&url(), NoTls).await?;
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {annals_schema} CASCADE; \
             DROP SCHEMA IF EXISTS {commands_schema} CASCADE; \
             DROP SCHEMA IF EXISTS {seed_schema} CASCADE;"
        ))
        .await?;
    Ok(())
}
