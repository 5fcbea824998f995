//! Serves annals' metrics on `/metrics` for Prometheus, while commands and a
//! projection run, and prints the runtime's health snapshot: what a service
//! returns from its own health endpoint.
//!
//! ```text
//! cargo run --release --example metrics
//! ANNALS_METRICS_ADDR=0.0.0.0:9187 ANNALS_METRICS_SECONDS=60 cargo run --release --example metrics
//! ```
//!
//! It installs the Prometheus exporter (`metrics-exporter-prometheus` with
//! its HTTP listener) *before* it opens the runtime, since annals registers
//! its metric handles when the runtime, the stores and the projections are
//! made; runs 2,000 deposits and some refused withdrawals over 100 accounts
//! and a projection; scrapes its own `/metrics` once and prints the annals
//! lines; keeps serving for `ANNALS_METRICS_SECONDS` (default 2) so that you
//! can `curl` it; then shuts down and prints the health again. It exits by
//! itself.

use std::error::Error;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use annals::projection::{ProjectionContext, ProjectionError};
use annals::{
    Aggregate, CommandError, DomainEvent, EventStore, Projection, ProjectionConfig, RecordedEvent,
    Runtime, RuntimeConfig, SledStore,
};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde::{Deserialize, Serialize};

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum AccountEvent {
    Deposited { amount: u64 },
    Withdrawn { amount: u64 },
}
impl DomainEvent for AccountEvent {}

#[derive(Debug)]
enum AccountCommand {
    Deposit(u64),
    Withdraw(u64),
}

#[derive(Debug, thiserror::Error)]
#[error("insufficient funds")]
struct InsufficientFunds;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Account {
    balance: u64,
}

impl Aggregate for Account {
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = InsufficientFunds;
    const CATEGORY: &'static str = "account";

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, InsufficientFunds> {
        match *command {
            AccountCommand::Deposit(amount) => Ok(vec![AccountEvent::Deposited { amount }]),
            AccountCommand::Withdraw(amount) if amount > self.balance => Err(InsufficientFunds),
            AccountCommand::Withdraw(amount) => Ok(vec![AccountEvent::Withdrawn { amount }]),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }
}

/// Counts the events of the log: a stand-in for a read model.
struct EventCount(Arc<AtomicU64>);

impl Projection for EventCount {
    async fn handle(
        &mut self,
        _: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let addr: SocketAddr = std::env::var("ANNALS_METRICS_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:9187".to_owned())
        .parse()?;
    let serve_for = Duration::from_secs(
        std::env::var("ANNALS_METRICS_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2),
    );

    // 1. The exporter first: handles registered before it record nothing.
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;
    annals::metrics::describe();

    // 2. The service: a runtime on a sled store, a projection it owns.
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    let runtime = Runtime::new(store, RuntimeConfig::default());
    let counted = Arc::new(AtomicU64::new(0));
    let projection = runtime
        .start_projection(
            ProjectionConfig::builder("event-count").build()?,
            EventCount(Arc::clone(&counted)),
        )
        .await?;

    // 3. Some traffic: 2,000 deposits from 50 tasks over 100 accounts, then
    // one overdraft per account, which the domain refuses.
    let accounts = runtime.aggregates::<Account>();
    let mut tasks = Vec::new();
    for task in 0..50u64 {
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..40u64 {
                let id = format!("{}", (task * 40 + n) % 100);
                accounts.execute(&id, AccountCommand::Deposit(10)).await?;
            }
            Ok::<_, CommandError<InsufficientFunds>>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let mut refused = 0;
    for id in 0..100 {
        if let Err(CommandError::Domain(_)) = accounts
            .execute(&id.to_string(), AccountCommand::Withdraw(1_000_000))
            .await
        {
            refused += 1;
        }
    }
    let head = runtime.store().head_position();
    projection.wait_for(head, Duration::from_secs(30)).await?;
    println!(
        "commands: 2000 committed, {refused} refused; projection counted {} events",
        counted.load(Ordering::Relaxed)
    );

    // 4. What Prometheus sees: one scrape of our own endpoint.
    let body = tokio::task::spawn_blocking(move || scrape(addr)).await??;
    println!(
        "\n--- GET http://{addr}/metrics (annals lines; of each histogram, p99, sum, count) ---"
    );
    for line in body.lines() {
        let quantile = line.contains("quantile=") && !line.contains("quantile=\"0.99\"");
        if line.starts_with("annals_") && !quantile {
            println!("{line}");
        }
    }

    // 5. The health snapshot a service would serve on its health endpoint.
    let health = runtime.health();
    println!("\n--- runtime.health() ---");
    println!("healthy: {}", health.is_healthy());
    println!(
        "store writer: {:?}, writable: {}",
        health.store.writer,
        health.store.is_writable()
    );
    println!("live aggregates: {}", health.live_aggregates);
    for projection in &health.projections {
        println!(
            "projection {}: {:?}, position {}, lag {}",
            projection.name, projection.state, projection.position, projection.lag
        );
    }
    println!("last error: {:?}", health.last_error.map(|e| e.message));

    println!("\nserving http://{addr}/metrics for {serve_for:?}");
    tokio::time::sleep(serve_for).await;
    runtime.shutdown().await?;
    let health = runtime.health();
    println!(
        "after shutdown: healthy {}, store writer {:?}",
        health.is_healthy(),
        health.store.writer
    );
    Ok(())
}

/// A plain HTTP/1.0 GET of `/metrics` (the example needs no HTTP client).
fn scrape(addr: SocketAddr) -> Result<String> {
    let mut last_error = None;
    // The listener starts in the background: try a few times.
    for _ in 0..50 {
        match std::net::TcpStream::connect(addr) {
            Ok(mut stream) => {
                stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                return Ok(response);
            }
            Err(error) => last_error = Some(error),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("cannot reach {addr}: {last_error:?}").into())
}
