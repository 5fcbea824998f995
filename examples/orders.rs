//! The main job: an order domain with real rules, run as thousands of
//! concurrent aggregates on the sled store. Shows a command the domain
//! refuses and a conflict with another writer that the runtime handles, then
//! compares commands/s through the actors with the raw append rate of the
//! store measured in the same run.
//!
//! `cargo run --release --example orders [--orders N] [path]`
//! (or `ORDERS=N`; default 2,000 orders of 5 commands each, in a temporary
//! directory unless `path` is given; `RUST_LOG=annals=debug` shows the spans).

use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::{
    encode_event, Aggregate, CommandError, DomainEvent, EventStore, ExpectedVersion, NewEvent,
    Runtime, RuntimeConfig, SledStore, StreamId,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// The domain: all rules in `handle`, none in `apply`.

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum OrderEvent {
    OrderCreated {
        customer: String,
    },
    ItemAdded {
        sku: String,
        quantity: u32,
        price_cents: u64,
    },
    OrderConfirmed {
        total_cents: u64,
    },
    OrderShipped,
    OrderCancelled {
        reason: String,
    },
}

impl DomainEvent for OrderEvent {}

/// What an order is asked to do.
#[derive(Debug, Clone)]
enum OrderCommand {
    CreateOrder {
        customer: String,
    },
    AddItem {
        sku: String,
        quantity: u32,
        price_cents: u64,
    },
    ConfirmOrder,
    ShipOrder,
    CancelOrder {
        reason: String,
    },
}

/// Why an order refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum OrderError {
    #[error("the order does not exist")]
    NotCreated,
    #[error("the order already exists")]
    AlreadyCreated,
    #[error("items can only be added to an open order; this one is {0}")]
    NotOpen(Status),
    #[error("a quantity must be at least 1")]
    ZeroQuantity,
    #[error("an order without items cannot be confirmed")]
    NoItems,
    #[error("only a confirmed order can be shipped; this one is {0}")]
    NotConfirmed(Status),
    #[error("this order is {0} and can no longer be cancelled")]
    CannotCancel(Status),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Status {
    #[default]
    None,
    Open,
    Confirmed,
    Shipped,
    Cancelled,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::None => "not created",
            Status::Open => "open",
            Status::Confirmed => "confirmed",
            Status::Shipped => "shipped",
            Status::Cancelled => "cancelled",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Line {
    sku: String,
    quantity: u32,
    price_cents: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Order {
    status: Status,
    customer: String,
    lines: Vec<Line>,
    /// Always the sum of the lines: kept up to date by `apply`.
    total_cents: u64,
}

impl Aggregate for Order {
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    const CATEGORY: &'static str = "order";

    fn handle(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderCommand as C;
        match (command, self.status) {
            (C::CreateOrder { customer }, Status::None) => Ok(vec![OrderEvent::OrderCreated {
                customer: customer.clone(),
            }]),
            (C::CreateOrder { .. }, _) => Err(OrderError::AlreadyCreated),
            (_, Status::None) => Err(OrderError::NotCreated),
            (C::AddItem { quantity: 0, .. }, _) => Err(OrderError::ZeroQuantity),
            (
                C::AddItem {
                    sku,
                    quantity,
                    price_cents,
                },
                Status::Open,
            ) => Ok(vec![OrderEvent::ItemAdded {
                sku: sku.clone(),
                quantity: *quantity,
                price_cents: *price_cents,
            }]),
            (C::AddItem { .. }, status) => Err(OrderError::NotOpen(status)),
            (C::ConfirmOrder, Status::Open) if self.lines.is_empty() => Err(OrderError::NoItems),
            (C::ConfirmOrder, Status::Open) => Ok(vec![OrderEvent::OrderConfirmed {
                total_cents: self.total_cents,
            }]),
            // Confirming twice is not an error: nothing to do.
            (C::ConfirmOrder, Status::Confirmed) => Ok(vec![]),
            (C::ConfirmOrder, status) => Err(OrderError::NotOpen(status)),
            (C::ShipOrder, Status::Confirmed) => Ok(vec![OrderEvent::OrderShipped]),
            (C::ShipOrder, status) => Err(OrderError::NotConfirmed(status)),
            (C::CancelOrder { reason }, Status::Open | Status::Confirmed) => {
                Ok(vec![OrderEvent::OrderCancelled {
                    reason: reason.clone(),
                }])
            }
            (C::CancelOrder { .. }, status) => Err(OrderError::CannotCancel(status)),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderCreated { customer } => {
                self.status = Status::Open;
                self.customer.clone_from(customer);
            }
            OrderEvent::ItemAdded {
                sku,
                quantity,
                price_cents,
            } => {
                self.total_cents += u64::from(*quantity) * price_cents;
                self.lines.push(Line {
                    sku: sku.clone(),
                    quantity: *quantity,
                    price_cents: *price_cents,
                });
            }
            OrderEvent::OrderConfirmed { .. } => self.status = Status::Confirmed,
            OrderEvent::OrderShipped => self.status = Status::Shipped,
            OrderEvent::OrderCancelled { .. } => self.status = Status::Cancelled,
        }
    }
}

// ---------------------------------------------------------------------------
// The run.

/// The five commands of order `n`: create, two items, confirm, then ship
/// (or, for every tenth order, cancel).
fn script(n: usize) -> Vec<OrderCommand> {
    let last = if cancelled(n) {
        OrderCommand::CancelOrder {
            reason: "customer changed their mind".to_owned(),
        }
    } else {
        OrderCommand::ShipOrder
    };
    vec![
        OrderCommand::CreateOrder {
            customer: format!("customer-{}", n % 97),
        },
        OrderCommand::AddItem {
            sku: format!("sku-{}", n % 13),
            quantity: 1 + (n % 3) as u32,
            price_cents: 250 + (n % 7) as u64 * 100,
        },
        OrderCommand::AddItem {
            sku: "sku-gift-wrap".to_owned(),
            quantity: 1,
            price_cents: 199,
        },
        OrderCommand::ConfirmOrder,
        last,
    ]
}

fn cancelled(n: usize) -> bool {
    n % 10 == 9
}

fn expected_total(n: usize) -> u64 {
    (1 + (n % 3) as u64) * (250 + (n % 7) as u64 * 100) + 199
}

struct Options {
    orders: usize,
    path: Option<std::path::PathBuf>,
}

fn options() -> Result<Options, Box<dyn std::error::Error>> {
    let mut orders = match std::env::var("ORDERS") {
        Ok(value) => value.parse()?,
        Err(_) => 2_000,
    };
    let mut path = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--orders" {
            orders = args.next().ok_or("--orders needs a number")?.parse()?;
        } else {
            path = Some(arg.into());
        }
    }
    Ok(Options { orders, path })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let Options { orders, path } = options()?;
    let temp = tempfile::tempdir()?;
    let path = path.unwrap_or_else(|| temp.path().join("orders"));

    let store = Arc::new(SledStore::open(&path)?);
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Order>();

    // Thousands of orders at once, each task running its order's commands
    // in sequence: one actor per order, all appends sharing group commits.
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(orders);
    for n in 0..orders {
        let handle = handle.clone();
        tasks.push(tokio::spawn(async move {
            let id = n.to_string();
            for command in script(n) {
                handle.execute(&id, command).await?;
            }
            Ok::<_, CommandError<OrderError>>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let commands = orders * 5;

    // Every order ended shipped (or cancelled), with the total of its items.
    let mut shipped = 0;
    for n in 0..orders {
        let order = handle.state(&n.to_string()).await?;
        let expected = if cancelled(n) {
            Status::Cancelled
        } else {
            Status::Shipped
        };
        assert_eq!(order.status, expected, "order {n}");
        assert_eq!(order.total_cents, expected_total(n), "order {n}");
        shipped += usize::from(order.status == Status::Shipped);
    }

    // A rule at work: no items after confirmation.
    let rejected = handle
        .execute(
            "0",
            OrderCommand::AddItem {
                sku: "sku-late".to_owned(),
                quantity: 1,
                price_cents: 100,
            },
        )
        .await
        .expect_err("a shipped order takes no items");
    println!("rejected:  AddItem on shipped order-0 -> {rejected}");
    if orders > 9 {
        let cancelled = handle
            .execute("9", OrderCommand::ShipOrder)
            .await
            .expect_err("a cancelled order cannot be shipped");
        println!("rejected:  ShipOrder on cancelled order-9 -> {cancelled}");
    }
    handle
        .execute(
            "extra",
            OrderCommand::CreateOrder {
                customer: "late".into(),
            },
        )
        .await?;
    let unconfirmed = handle
        .execute("extra", OrderCommand::ShipOrder)
        .await
        .expect_err("an open order cannot be shipped");
    println!("rejected:  ShipOrder on open order-extra -> {unconfirmed}");

    // Another writer appends to order-extra behind its actor's back (as
    // another process would). The next command, decided on version 1, meets
    // the conflict, catches up and is decided again on the new state.
    let stream = StreamId::new("order-extra")?;
    let outside = encode_event(&OrderEvent::ItemAdded {
        sku: "sku-from-elsewhere".to_owned(),
        quantity: 2,
        price_cents: 1_000,
    })?;
    let appended = store
        .append(
            &stream,
            ExpectedVersion::Exact(annals::Version(1)),
            vec![outside],
        )
        .await?;
    let added = handle
        .execute(
            "extra",
            OrderCommand::AddItem {
                sku: "sku-7".to_owned(),
                quantity: 1,
                price_cents: 500,
            },
        )
        .await?;
    let confirmed = handle.execute("extra", OrderCommand::ConfirmOrder).await?;
    let total = match confirmed.events.as_slice() {
        [OrderEvent::OrderConfirmed { total_cents }] => *total_cents,
        other => panic!("unexpected events {other:?}"),
    };
    assert_eq!((added.version.0, total), (3, 2_500));
    println!(
        "conflict:  an outside append moved order-extra to version {}; AddItem, decided at \
         version 1, conflicted, caught up and committed at version {}; ConfirmOrder totals \
         both items: {} cents",
        appended.last_version, added.version, total
    );

    let events = store.head_position().0;
    let stats = store.stats();
    runtime.shutdown().await?;

    // The raw store, same run: single-event appends from as many concurrent
    // tasks, straight to a second SledStore (no actors, no codec).
    let raw_store = Arc::new(SledStore::open(temp.path().join("raw"))?);
    let raw_started = Instant::now();
    let mut tasks = Vec::with_capacity(orders);
    for n in 0..orders {
        let raw_store = raw_store.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new(format!("raw-{n}"))?;
            for _ in 0..5 {
                let event = NewEvent::new("Appended", vec![0u8; 48]);
                raw_store
                    .append(&stream, ExpectedVersion::Any, vec![event])
                    .await?;
            }
            Ok::<_, annals::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let raw_elapsed = raw_started.elapsed();
    raw_store.shutdown().await?;

    let rate = |count: usize, elapsed: Duration| count as f64 / elapsed.as_secs_f64();
    println!();
    println!(
        "orders:          {orders} ({shipped} shipped, {} cancelled; states and totals checked)",
        orders - shipped
    );
    println!("events stored:   {events}");
    println!(
        "commands:        {commands} in {:.2} s",
        elapsed.as_secs_f64()
    );
    println!(
        "commands/s:      {:.0} (through the actors, fdatasync before each ack)",
        rate(commands, elapsed)
    );
    println!(
        "group commits:   {} for {} appends ({:.1} appends per fdatasync)",
        stats.group_commits,
        stats.appends,
        stats.appends as f64 / stats.group_commits.max(1) as f64
    );
    println!(
        "raw appends/s:   {:.0} ({commands} single-event appends from {orders} tasks on a second SledStore)",
        rate(commands, raw_elapsed)
    );
    println!(
        "actors vs raw:   {:.0}%",
        100.0 * rate(commands, elapsed) / rate(commands, raw_elapsed)
    );
    println!("store:           {}", path.display());
    Ok(())
}
