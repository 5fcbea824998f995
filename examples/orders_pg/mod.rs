//! The main job on PostgreSQL (`--pg` or `ANNALS_STORE=postgres`): the same
//! orders through the runtime, on a `PostgresStore`, with both read models
//! in PostgreSQL tables of the store's schema that a person can query with
//! psql, each committed with its checkpoint in one transaction. Several
//! instances may run at once on one schema (see the README, "Running several
//! instances"): each runs its own orders (ids and customers carry its
//! instance tag), any of them may host any aggregate, and exactly one runs
//! the read models (the others find the checkpoint's lease taken and say so).

use super::*;

use annals::codec::decode_event;
use annals::projection::{ProjectionControlError, ReadModel};
use annals::store::{PostgresConfig, PostgresStore, PostgresTransaction};
use annals::Position;

const DEFAULT_URL: &str = "postgresql://postgres@127.0.0.1:5432/test";

/// Orders by status, in `<schema>.order_status` and `<schema>.status_counts`.
struct OrdersByStatusPg {
    schema: String,
}

impl ReadModel<PostgresStore> for OrdersByStatusPg {
    fn tables(&self) -> Vec<String> {
        let s = &self.schema;
        vec![format!("{s}.order_status"), format!("{s}.status_counts")]
    }

    async fn handle(
        &mut self,
        recorded: &RecordedEvent,
        transaction: &mut PostgresTransaction,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let status = match decode_event::<OrderEvent>(recorded)? {
            OrderEvent::OrderCreated { .. } => Status::Open,
            OrderEvent::OrderConfirmed { .. } => Status::Confirmed,
            OrderEvent::OrderShipped => Status::Shipped,
            OrderEvent::OrderCancelled { .. } => Status::Cancelled,
            OrderEvent::ItemAdded { .. } => return Ok(()),
        };
        let s = &self.schema;
        let id = order_id(recorded);
        let status = status.to_string();
        let old = transaction
            .query_opt(
                &format!("SELECT status FROM {s}.order_status WHERE order_id = $1"),
                &[&id],
            )
            .await?;
        if let Some(old) = old {
            let old: String = old.get(0);
            transaction
                .execute(
                    &format!("UPDATE {s}.status_counts SET orders = orders - 1 WHERE status = $1"),
                    &[&old],
                )
                .await?;
        }
        transaction
            .execute(
                &format!(
                    "INSERT INTO {s}.order_status VALUES ($1, $2) \
                     ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status"
                ),
                &[&id, &status],
            )
            .await?;
        transaction
            .execute(
                &format!(
                    "INSERT INTO {s}.status_counts VALUES ($1, 1) \
                     ON CONFLICT (status) DO UPDATE SET orders = status_counts.orders + 1"
                ),
                &[&status],
            )
            .await?;
        Ok(())
    }

    async fn reset(
        &mut self,
        transaction: &mut PostgresTransaction,
    ) -> Result<(), ProjectionError> {
        let s = &self.schema;
        transaction
            .batch_execute(&format!(
                "DELETE FROM {s}.order_status; DELETE FROM {s}.status_counts"
            ))
            .await
    }
}

/// Revenue per customer, in `<schema>.revenue` (and `<schema>.unshipped`
/// for the orders on their way).
struct RevenuePg {
    schema: String,
}

impl ReadModel<PostgresStore> for RevenuePg {
    fn tables(&self) -> Vec<String> {
        let s = &self.schema;
        vec![format!("{s}.unshipped"), format!("{s}.revenue")]
    }

    async fn handle(
        &mut self,
        recorded: &RecordedEvent,
        transaction: &mut PostgresTransaction,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let s = &self.schema;
        let id = order_id(recorded);
        let changed = match decode_event::<OrderEvent>(recorded)? {
            OrderEvent::OrderCreated { customer } => {
                transaction
                    .execute(
                        &format!("INSERT INTO {s}.unshipped VALUES ($1, $2, 0)"),
                        &[&id, &customer],
                    )
                    .await?
            }
            OrderEvent::OrderConfirmed { total_cents } => {
                transaction
                    .execute(
                        &format!("UPDATE {s}.unshipped SET total_cents = $2 WHERE order_id = $1"),
                        &[&id, &(total_cents as i64)],
                    )
                    .await?
            }
            OrderEvent::OrderShipped => {
                transaction
                    .execute(
                        &format!(
                            "WITH gone AS (DELETE FROM {s}.unshipped WHERE order_id = $1 \
                             RETURNING customer, total_cents) \
                             INSERT INTO {s}.revenue SELECT customer, total_cents FROM gone \
                             ON CONFLICT (customer) DO UPDATE \
                             SET cents = revenue.cents + EXCLUDED.cents"
                        ),
                        &[&id],
                    )
                    .await?
            }
            OrderEvent::OrderCancelled { .. } => {
                transaction
                    .execute(
                        &format!("DELETE FROM {s}.unshipped WHERE order_id = $1"),
                        &[&id],
                    )
                    .await?
            }
            OrderEvent::ItemAdded { .. } => return Ok(()),
        };
        // An event out of place is a failure, never a silent 0.
        if changed != 1 {
            return Err(ProjectionError::handler(format!(
                "order-{id} was never created"
            )));
        }
        Ok(())
    }

    async fn reset(
        &mut self,
        transaction: &mut PostgresTransaction,
    ) -> Result<(), ProjectionError> {
        let s = &self.schema;
        transaction
            .batch_execute(&format!(
                "DELETE FROM {s}.unshipped; DELETE FROM {s}.revenue"
            ))
            .await
    }
}

/// Creates the read models' tables if missing.
async fn create_tables(
    url: &str,
    s: &str,
) -> Result<tokio_postgres::Client, Box<dyn std::error::Error>> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            // Serialized: instances starting together would race on
            // CREATE TABLE IF NOT EXISTS (a unique violation in pg_type).
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('annals orders tables {s}'));
             CREATE TABLE IF NOT EXISTS {s}.order_status (order_id text PRIMARY KEY, status text NOT NULL);
             CREATE TABLE IF NOT EXISTS {s}.status_counts (status text PRIMARY KEY, orders bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS {s}.unshipped (order_id text PRIMARY KEY, customer text NOT NULL,
                 total_cents bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS {s}.revenue (customer text PRIMARY KEY, cents bigint NOT NULL);
             COMMIT"
        ))
        .await?;
    Ok(client)
}

/// Starts a read model, or `None` when another instance runs it.
async fn start<P: ReadModel<PostgresStore>>(
    store: &Arc<PostgresStore>,
    name: &str,
    model: P,
) -> Result<Option<ProjectionHandle>, Box<dyn std::error::Error>> {
    let config = ProjectionConfig::builder(name)
        .filter(EventFilter::Category(Order::CATEGORY.to_owned()))
        .build()?;
    match ProjectionHandle::spawn_read_model(Arc::clone(store), config, model).await {
        Ok(handle) => Ok(Some(handle)),
        Err(ProjectionControlError::AlreadyRunning { .. }) => {
            println!("projection:      {name} runs in another instance (it holds the lease)");
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

pub(crate) async fn run(orders: usize) -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("ANNALS_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let schema = std::env::var("ANNALS_PG_SCHEMA").unwrap_or_else(|_| "orders".to_owned());
    let tag =
        std::env::var("ANNALS_INSTANCE").unwrap_or_else(|_| format!("i{}", std::process::id()));
    let store = Arc::new(PostgresStore::open(
        PostgresConfig::new(url.clone()).schema(schema.clone()),
    )?);
    let client = create_tables(&url, &schema).await?;
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Order>();
    let by_status = start(
        &store,
        "orders-by-status",
        OrdersByStatusPg {
            schema: schema.clone(),
        },
    )
    .await?;
    let revenue = start(
        &store,
        "revenue-per-customer",
        RevenuePg {
            schema: schema.clone(),
        },
    )
    .await?;

    // This instance's orders: ids and customers carry its tag, so several
    // instances on one schema never share an order or a customer.
    let id_of = |n: usize| format!("{tag}_{n}");
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(orders);
    for n in 0..orders {
        let handle = handle.clone();
        let (id, customer) = (id_of(n), format!("{tag}-customer-{}", n % 97));
        tasks.push(tokio::spawn(async move {
            for command in script(n) {
                let command = match command {
                    OrderCommand::CreateOrder { .. } => OrderCommand::CreateOrder {
                        customer: customer.clone(),
                    },
                    other => other,
                };
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
    let mut states = BTreeMap::new();
    for n in 0..orders {
        let order = handle.state(&id_of(n)).await?;
        assert_eq!(order.total_cents, expected_total(n), "order {n}");
        states.insert(id_of(n), order);
    }
    let head: Position = store.head_position();

    println!("store:           PostgreSQL {url}, schema {schema}, instance {tag}");
    println!(
        "commands:        {commands} in {:.2} s ({:.0} commands/s through the actors, \
         synchronous_commit = on)",
        elapsed.as_secs_f64(),
        commands as f64 / elapsed.as_secs_f64()
    );
    let mut checked = false;
    // Longer than on sled: a read model here costs a few statements per
    // event, and other instances' events count too. Whatever this instance
    // runs is caught up before it exits.
    let wait = WAIT * 12;
    for projection in [&by_status, &revenue].into_iter().flatten() {
        projection.wait_for(head, wait).await?;
    }
    if let (Some(_), Some(_)) = (&by_status, &revenue) {
        // This instance's part of the read models against its aggregates.
        let pattern = format!("{tag}\\_%");
        let statuses: BTreeMap<String, String> = client
            .query(
                &format!(
                    "SELECT order_id, status FROM {schema}.order_status WHERE order_id LIKE $1"
                ),
                &[&pattern],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let revenue_rows: BTreeMap<String, i64> = client
            .query(
                &format!("SELECT customer, cents FROM {schema}.revenue WHERE customer LIKE $1"),
                &[&format!("{tag}-%")],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let expected = ReadModels::expected(&states);
        let actual = ReadModels {
            statuses: statuses
                .iter()
                .map(|(id, status)| {
                    let status = [
                        Status::Open,
                        Status::Confirmed,
                        Status::Shipped,
                        Status::Cancelled,
                    ]
                    .into_iter()
                    .find(|s| s.to_string() == *status)
                    .unwrap_or_default();
                    (id.clone(), status)
                })
                .collect(),
            status_counts: expected.status_counts.clone(),
            revenue: revenue_rows
                .into_iter()
                .map(|(c, v)| (c, v as u64))
                .collect(),
        };
        let differences = actual.differences(&expected);
        if !differences.is_empty() {
            for difference in differences.iter().take(20) {
                eprintln!("mismatch:  {difference}");
            }
            return Err(format!(
                "the read models disagree with the aggregates in {} places",
                differences.len()
            )
            .into());
        }
        checked = true;
        println!(
            "read models:     {schema}.order_status, {schema}.status_counts, {schema}.revenue \
             (= aggregates for this instance's {orders} orders); try \
             psql -c 'SELECT * FROM {schema}.revenue ORDER BY cents DESC LIMIT 3'"
        );
    }
    for projection in [by_status, revenue].into_iter().flatten() {
        let checkpoint = projection.shutdown().await?;
        print_projection(&projection.status(), checkpoint);
    }
    runtime.shutdown().await?;
    if checked {
        println!("all checks passed");
    } else {
        println!(
            "aggregate states checked; the read models are checked by the instance running them"
        );
    }
    Ok(())
}
