//! Workflows across aggregates: orders, stock and payments, and one
//! process manager (`fulfilment_domain::Fulfil`) that reserves stock,
//! takes the payment and ships; releases the stock and cancels when the
//! payment is refused; and cancels orders still unpaid after a timeout.
//! Thousands of orders run concurrently; then the log is checked: stock
//! never negative, no order both paid and cancelled, no payment taken
//! twice, every order shipped or cancelled.
//!
//! `cargo run --release --example fulfilment` (`ORDERS=N`, default 2000).
//! Prints `name: value` lines, then "all checks passed".

mod fulfilment_domain;

use std::time::{Duration, Instant};

use annals::workflow::WorkflowConfig;
use annals::{EventStore, Runtime};
use fulfilment_domain::{check, order_of, Fulfil, StockCommand};

const SKUS: u64 = 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let orders: u64 = std::env::var("ORDERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::open(dir.path())?;

    // Stock for about 90% of the orders: some run out.
    let stock = runtime.aggregates::<fulfilment_domain::Stock>();
    for sku in 0..SKUS {
        let quantity = (orders * 2 * 9 / 10 / SKUS) as u32;
        stock
            .execute(&format!("s{sku}"), StockCommand::Restock { quantity })
            .await?;
    }
    let timeout = Duration::from_millis(500);
    let workflow = runtime
        .start_workflow(Fulfil::new(&runtime, timeout), WorkflowConfig::default())
        .await?;

    // Customers place every order. Bank transfers never arrive here: those
    // orders are cancelled by the timeout.
    let started = Instant::now();
    let mut customers = tokio::task::JoinSet::new();
    for customer in 0..64 {
        let runtime = runtime.clone();
        customers.spawn(async move {
            let placing = runtime.aggregates::<fulfilment_domain::Order>();
            for n in (customer..orders).step_by(64) {
                let (id, place) = order_of(n, SKUS);
                placing.execute(&id, place).await.expect("place");
            }
        });
    }
    while let Some(done) = customers.join_next().await {
        done?;
    }
    // Wait until every instance is done (timers included).
    loop {
        let status = workflow
            .wait_for(runtime.store().head_position(), Duration::from_secs(120))
            .await?;
        if status.running == 0 && status.completed as u64 >= orders {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let status = workflow.status();
    runtime.shutdown().await?;

    let store = annals::SledStore::open(dir.path())?;
    let checked = check(&store).await;
    store.shutdown().await?;
    println!("orders: {}", checked.orders);
    println!("shipped: {}", checked.shipped);
    println!("cancelled: {}", checked.cancelled);
    println!(
        "workflows_per_s: {:.0}",
        orders as f64 / elapsed.as_secs_f64()
    );
    println!(
        "commands_per_workflow: {:.2}",
        checked.commands as f64 / orders as f64
    );
    println!("duplicate_commands: {}", checked.duplicate_commands);
    println!("lost_steps: {}", checked.lost_steps);
    println!("inconsistent: {}", checked.inconsistent);
    println!("failed_instances: {}", status.failed.len());
    assert_eq!(checked.orders, orders);
    assert_eq!(
        checked.shipped + checked.cancelled,
        orders,
        "every order ends"
    );
    assert_eq!(checked.duplicate_commands, 0);
    assert_eq!(checked.lost_steps, 0);
    assert_eq!(checked.inconsistent, 0);
    assert!(status.failed.is_empty());
    assert!(
        checked.shipped > 0 && checked.cancelled > 0,
        "both paths ran"
    );
    println!("all checks passed");
    Ok(())
}
