//! The main job: an order domain with real rules, run as thousands of
//! concurrent aggregates on the sled store. Shows a command the domain
//! refuses and a conflict with another writer that the runtime handles, and
//! prints commands/s through the actors (the store's own figures, beside an
//! SQLite baseline, are the `throughput` example's). Two projections keep read models in the
//! same sled database, each committed with its checkpoint: orders by status
//! (started before the load, it follows it live) and revenue per customer
//! (started after it, it catches up from the store). At the end the example
//! waits for the position of its last command and checks both read models
//! against the aggregates' states, failing on any difference.
//!
//! `cargo run --release --example orders [--orders N] [path]`
//! (or `ORDERS=N`; default 2,000 orders of 5 commands each, in a temporary
//! directory unless `path` is given; `RUST_LOG=annals=debug` shows the spans).
//!
//! On PostgreSQL: `cargo run --release --example orders -- --pg` (or
//! `ANNALS_STORE=postgres`; server `ANNALS_PG_URL`, schema
//! `ANNALS_PG_SCHEMA`, default `orders`): the read models are then tables
//! of that schema, and several instances may run at once (`orders_pg/`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::codec::encode_event;
use annals::projection::{
    ProjectionContext, ProjectionError, ProjectionStatus, Typed, TypedSledProjection,
};
use annals::store::{EventFilter, ReadModelBatch};
use annals::{
    Aggregate, CommandError, DomainEvent, EventStore, ExpectedVersion, ProjectionConfig,
    ProjectionHandle, RecordedEvent, Runtime, RuntimeConfig, SledStore, StreamId,
};
use serde::{Deserialize, Serialize};

mod orders_pg;

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
// The read models: two projections whose trees live in the store's own sled
// database, each batch committed with the projection's checkpoint in one
// transaction, so every event takes effect exactly once.

/// order id -> its status (postcard).
const ORDER_STATUS: &str = "order-status";
/// status name -> how many orders have it (u64; absent when 0).
const STATUS_COUNTS: &str = "status-counts";
/// order id -> customer and confirmed total, until the order ships or is
/// cancelled: `OrderShipped` carries no amount, so the projection remembers
/// it from `OrderConfirmed`.
const UNSHIPPED: &str = "revenue-unshipped";
/// customer -> cents of their shipped orders (u64).
const REVENUE: &str = "revenue-per-customer";

/// The aggregate id of an order's stream (`17` in `order-17`).
fn order_id(event: &RecordedEvent) -> &str {
    let stream = event.stream_id.as_str();
    stream
        .strip_prefix(Order::CATEGORY)
        .and_then(|rest| rest.strip_prefix('-'))
        .unwrap_or(stream)
}

/// Adds `delta` to a count, removing the key when it reaches 0.
fn add_to_count(
    batch: &mut ReadModelBatch,
    tree: &str,
    key: &str,
    delta: i64,
) -> Result<(), ProjectionError> {
    let count = batch
        .get::<u64>(tree, key)?
        .unwrap_or(0)
        .checked_add_signed(delta)
        .ok_or_else(|| ProjectionError::handler(format!("{tree}/{key} would go below 0")))?;
    if count == 0 {
        batch.remove(tree, key)
    } else {
        batch.put(tree, key, &count)
    }
}

/// Orders by status: each order's status, and how many orders have each.
struct OrdersByStatus;

impl TypedSledProjection for OrdersByStatus {
    type Event = OrderEvent;

    fn trees(&self) -> Vec<String> {
        vec![ORDER_STATUS.into(), STATUS_COUNTS.into()]
    }

    fn handle(
        &mut self,
        event: OrderEvent,
        recorded: &RecordedEvent,
        batch: &mut ReadModelBatch,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let status = match event {
            OrderEvent::OrderCreated { .. } => Status::Open,
            OrderEvent::OrderConfirmed { .. } => Status::Confirmed,
            OrderEvent::OrderShipped => Status::Shipped,
            OrderEvent::OrderCancelled { .. } => Status::Cancelled,
            OrderEvent::ItemAdded { .. } => return Ok(()),
        };
        let id = order_id(recorded);
        if let Some(old) = batch.get::<Status>(ORDER_STATUS, id)? {
            add_to_count(batch, STATUS_COUNTS, &old.to_string(), -1)?;
        }
        batch.put(ORDER_STATUS, id, &status)?;
        add_to_count(batch, STATUS_COUNTS, &status.to_string(), 1)
    }
}

/// An order on its way, as the revenue projection remembers it.
#[derive(Debug, Serialize, Deserialize)]
struct Unshipped {
    customer: String,
    total_cents: u64,
}

/// Revenue per customer: the totals of their shipped orders.
struct RevenuePerCustomer;

impl TypedSledProjection for RevenuePerCustomer {
    type Event = OrderEvent;

    fn trees(&self) -> Vec<String> {
        vec![UNSHIPPED.into(), REVENUE.into()]
    }

    fn handle(
        &mut self,
        event: OrderEvent,
        recorded: &RecordedEvent,
        batch: &mut ReadModelBatch,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let id = order_id(recorded);
        match event {
            OrderEvent::OrderCreated { customer } => {
                let order = Unshipped {
                    customer,
                    total_cents: 0,
                };
                batch.put(UNSHIPPED, id, &order)
            }
            OrderEvent::OrderConfirmed { total_cents } => {
                let mut order = unshipped(batch, id)?;
                order.total_cents = total_cents;
                batch.put(UNSHIPPED, id, &order)
            }
            OrderEvent::OrderShipped => {
                let order = unshipped(batch, id)?;
                batch.update::<u64>(REVENUE, &order.customer, |cents| cents + order.total_cents)?;
                // Shipped orders are done: the tree holds only orders on
                // their way, not every order ever placed.
                batch.remove(UNSHIPPED, id)
            }
            OrderEvent::OrderCancelled { .. } => batch.remove(UNSHIPPED, id),
            OrderEvent::ItemAdded { .. } => Ok(()),
        }
    }
}

/// An order the revenue projection saw created. Missing means an event out
/// of place: a failure for the projection's policy, never a silent 0.
fn unshipped(batch: &ReadModelBatch, id: &str) -> Result<Unshipped, ProjectionError> {
    batch
        .get(UNSHIPPED, id)?
        .ok_or_else(|| ProjectionError::handler(format!("order-{id} was never created")))
}

/// The read models as committed, next to what the aggregates say.
#[derive(Debug, Default)]
struct ReadModels {
    statuses: BTreeMap<String, Status>,
    status_counts: BTreeMap<String, u64>,
    revenue: BTreeMap<String, u64>,
}

impl ReadModels {
    fn read(store: &SledStore) -> Result<Self, annals::store::ReadModelError> {
        Ok(Self {
            statuses: store
                .read_model(ORDER_STATUS)?
                .iter()?
                .into_iter()
                .collect(),
            status_counts: store
                .read_model(STATUS_COUNTS)?
                .iter()?
                .into_iter()
                .collect(),
            revenue: store.read_model(REVENUE)?.iter()?.into_iter().collect(),
        })
    }

    /// What the read models must hold, computed from the aggregates' states.
    fn expected(orders: &BTreeMap<String, Order>) -> Self {
        let mut expected = Self::default();
        for (id, order) in orders {
            expected.statuses.insert(id.clone(), order.status);
            *expected
                .status_counts
                .entry(order.status.to_string())
                .or_default() += 1;
            if order.status == Status::Shipped {
                *expected.revenue.entry(order.customer.clone()).or_default() += order.total_cents;
            }
        }
        expected
    }

    /// The differences, described; empty when the two agree.
    fn differences(&self, expected: &Self) -> Vec<String> {
        let mut differences = Vec::new();
        differ(
            "status of order",
            &self.statuses,
            &expected.statuses,
            &mut differences,
        );
        differ(
            "orders",
            &self.status_counts,
            &expected.status_counts,
            &mut differences,
        );
        differ(
            "revenue of",
            &self.revenue,
            &expected.revenue,
            &mut differences,
        );
        differences
    }
}

fn differ<V: PartialEq + std::fmt::Debug>(
    what: &str,
    actual: &BTreeMap<String, V>,
    expected: &BTreeMap<String, V>,
    differences: &mut Vec<String>,
) {
    let keys: BTreeSet<&String> = actual.keys().chain(expected.keys()).collect();
    for key in keys {
        let (got, want) = (actual.get(key), expected.get(key));
        if got != want {
            differences.push(format!(
                "{what} {key}: read model {got:?}, aggregates {want:?}"
            ));
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

/// How long the example waits for a projection before calling it stuck.
const WAIT: Duration = Duration::from_secs(10);

fn print_projection(status: &ProjectionStatus, checkpoint: annals::Position) {
    println!(
        "projection:      {} {} at position {}, lag {}, {} events handled, checkpoint {} \
         saved at shutdown",
        status.name,
        format!("{:?}", status.state).to_lowercase(),
        status.position,
        status.lag,
        status.events_handled,
        checkpoint
    );
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
    postgres: bool,
}

fn options() -> Result<Options, Box<dyn std::error::Error>> {
    let mut orders = match std::env::var("ORDERS") {
        Ok(value) => value.parse()?,
        Err(_) => 2_000,
    };
    let mut path = None;
    let mut postgres = std::env::var("ANNALS_STORE").is_ok_and(|v| v == "postgres");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--pg" {
            postgres = true;
        } else if arg == "--orders" {
            orders = args.next().ok_or("--orders needs a number")?.parse()?;
        } else {
            path = Some(arg.into());
        }
    }
    Ok(Options {
        orders,
        path,
        postgres,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let Options {
        orders,
        path,
        postgres,
    } = options()?;
    if postgres {
        return orders_pg::run(orders).await;
    }
    let temp = tempfile::tempdir()?;
    let path = path.unwrap_or_else(|| temp.path().join("orders"));

    let store = Arc::new(SledStore::open(&path)?);
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Order>();

    // Orders by status starts before the load and follows it live; revenue
    // per customer starts after it and catches up from the store first.
    let orders_only = EventFilter::Category(Order::CATEGORY.to_owned());
    let by_status = ProjectionHandle::spawn_sled(
        store.clone(),
        ProjectionConfig::builder("orders-by-status")
            .filter(orders_only.clone())
            .build()?,
        Typed(OrdersByStatus),
    )
    .await?;

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

    // The whole load is in the log: a projection started now reads it all
    // from the store before it turns to the live feed.
    let head = store.head_position();
    let catch_up_started = Instant::now();
    let revenue = ProjectionHandle::spawn_sled(
        store.clone(),
        ProjectionConfig::builder("revenue-per-customer")
            .filter(orders_only)
            .build()?,
        Typed(RevenuePerCustomer),
    )
    .await?;
    revenue.wait_for(head, WAIT).await?;
    let catch_up = catch_up_started.elapsed();
    let caught_up = revenue.status().events_handled;

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
    let last = confirmed.position.ok_or("ConfirmOrder stored no event")?;
    println!(
        "conflict:  an outside append moved order-extra to version {}; AddItem, decided at \
         version 1, conflicted, caught up and committed at version {}; ConfirmOrder totals \
         both items: {} cents",
        appended.last_version, added.version, total
    );

    // Read-your-writes: once both projections reached the position of the
    // last command, their read models must say what the aggregates say.
    let waited = Instant::now();
    tokio::try_join!(by_status.wait_for(last, WAIT), revenue.wait_for(last, WAIT))?;
    let projection_wait = waited.elapsed();
    let mut states = BTreeMap::new();
    for id in (0..orders)
        .map(|n| n.to_string())
        .chain(["extra".to_owned()])
    {
        let order = handle.state(&id).await?;
        states.insert(id, order);
    }
    let read_models = ReadModels::read(&store)?;
    let differences = read_models.differences(&ReadModels::expected(&states));
    let projections = [by_status.status(), revenue.status()];
    // Projections first: their final checkpoint save needs the store open.
    let checkpoints = [by_status.shutdown().await?, revenue.shutdown().await?];

    let events = store.head_position().0;
    let stats = store.stats();
    runtime.shutdown().await?;
    if !differences.is_empty() {
        for difference in differences.iter().take(20) {
            eprintln!("mismatch:  {difference}");
        }
        return Err(format!(
            "the read models disagree with the aggregates in {} places (at most 20 listed)",
            differences.len()
        )
        .into());
    }

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
    let count = |status: Status| {
        let count = read_models.status_counts.get(&status.to_string());
        format!("{} {status}", count.copied().unwrap_or(0))
    };
    println!(
        "by status:       {}, {}, {}, {} ({} orders; read model = aggregates)",
        count(Status::Open),
        count(Status::Confirmed),
        count(Status::Shipped),
        count(Status::Cancelled),
        read_models.statuses.len()
    );
    let mut customers: Vec<_> = read_models.revenue.iter().collect();
    customers.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let top: Vec<String> = customers
        .iter()
        .take(3)
        .map(|(customer, cents)| format!("{customer} ${}.{:02}", *cents / 100, *cents % 100))
        .collect();
    println!(
        "top customers:   {} ({} customers with shipped orders; read model = aggregates)",
        top.join(", "),
        customers.len()
    );
    for (status, checkpoint) in projections.iter().zip(checkpoints) {
        print_projection(status, checkpoint);
    }
    println!(
        "catch-up:        revenue-per-customer, started after the load, handled {caught_up} \
         events in {:.3} s ({:.0} events/s)",
        catch_up.as_secs_f64(),
        rate(caught_up as usize, catch_up)
    );
    println!(
        "projection_wait_us: {} (wait_for position {last} on both, after the last command returned)",
        projection_wait.as_micros()
    );
    println!("store:           {}", path.display());
    Ok(())
}
