//! The fulfilment workflow under real `kill -9` (invariant I7 for process
//! managers): the parent re-runs this test binary as a child that opens a
//! sled runtime, starts the `fulfilment` process manager and places orders
//! concurrently; the parent kills it with SIGKILL at a random moment
//! (sometimes while it is still loading instances), many times on one
//! store. Then a last run, not killed, lets every workflow finish (timers
//! included), and the log is checked: every order shipped or cancelled
//! (`lost_steps`), no reservation, release or payment taken twice
//! (`duplicate_commands`: the stock and payment aggregates do not refuse
//! repeats, so a duplicate would show), and no order paid and cancelled,
//! shipped unpaid, or holding stock or money once cancelled
//! (`inconsistent`).
//!
//! `ANNALS_WORKFLOW_CRASH_CYCLES=N cargo test --release --test workflow_crash -- --nocapture`
//! runs N cycles (default 8, bounded for CI) and prints
//! `workflow_crash cycles=N orders=M completed=C duplicate_commands=0 lost_steps=0 inconsistent=0`.

#[path = "../examples/fulfilment_domain/mod.rs"]
mod fulfilment_domain;

use std::process::{Command, Stdio};
use std::time::Duration;

use annals::workflow::WorkflowConfig;
use annals::{CommandContext, EventStore, Runtime};
use fulfilment_domain::{check, order_of, Fulfil, Stock, StockCommand};
use uuid::Uuid;

const CHILD_DIR: &str = "ANNALS_WORKFLOW_CRASH_DIR";
const CHILD_CYCLE: &str = "ANNALS_WORKFLOW_CRASH_CYCLE";
const ORDERS_PER_CYCLE: u64 = 60;
const SKUS: u64 = 6;
const TIMEOUT: Duration = Duration::from_millis(300);

/// A command id that is the same in every run: re-placing an order after a
/// crash is a retry, not a second order.
fn fixed_id(text: &str) -> Uuid {
    uuid::Builder::from_custom_bytes(stable_bytes(text)).into_uuid()
}

/// 16 bytes from a text, stable across runs (FNV-1a, twice).
fn stable_bytes(text: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (half, seed) in [0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4]
        .iter()
        .enumerate()
    {
        let mut hash = *seed;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x100_0000_01b3);
        }
        out[half * 8..half * 8 + 8].copy_from_slice(&hash.to_be_bytes());
    }
    out
}

/// Restocks once (fixed command ids), starts the workflow and places this
/// cycle's orders and every earlier cycle's again (retries after the
/// crash that may have cut them), from 8 tasks.
async fn run_child(dir: &str, cycle: u64) -> Runtime<annals::SledStore> {
    let runtime = Runtime::open(dir).expect("the store reopens after kill -9");
    let stock = runtime.aggregates::<Stock>();
    for sku in 0..SKUS {
        let id = format!("s{sku}");
        let context = CommandContext::default().with_command_id(fixed_id(&id));
        // Enough for about 80% of all the orders a default run places.
        let restock = StockCommand::Restock { quantity: 150 };
        stock
            .execute_with(&id, restock, context)
            .await
            .expect("restock");
    }
    let workflow = Fulfil::new(&runtime, TIMEOUT);
    runtime
        .start_workflow(workflow, WorkflowConfig::default().page_size(64))
        .await
        .expect("start the workflow");
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8u64 {
        let orders = runtime.aggregates::<fulfilment_domain::Order>();
        tasks.spawn(async move {
            let last = (cycle + 1) * ORDERS_PER_CYCLE;
            for n in (task..last).step_by(8) {
                let (id, place) = order_of(n, SKUS);
                let context = CommandContext::default().with_command_id(fixed_id(&id));
                match orders.execute_with(&id, place, context).await {
                    Ok(_) => {}
                    Err(error) => panic!("placing {id}: {error}"),
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("placing task");
    }
    runtime
}

#[test]
#[ignore = "run by workflow_crash_cycles as a child process"]
fn workflow_crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let cycle: u64 = std::env::var(CHILD_CYCLE).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let _runtime = run_child(&dir, cycle).await;
        println!("PLACED");
        // Keep working (the workflow, its timers) until killed.
        std::future::pending::<()>().await;
    });
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn workflow_crash_cycles() {
    let cycles: u64 = std::env::var("ANNALS_WORKFLOW_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for cycle in 0..cycles {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "workflow_crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_CYCLE, cycle.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Killed anywhere from while it opens the store and loads the
        // instances to well into the workflow's commands and timers.
        std::thread::sleep(Duration::from_millis(rng.next() % 700));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    // The last run is not killed: every order placed, every workflow to
    // its end (the unpaid ones by their timer).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let orders = cycles * ORDERS_PER_CYCLE;
    // A hang (an instance that never finishes) fails with the stuck
    // instances and what the log holds for them, instead of blocking CI.
    let deadline = Duration::from_secs(
        std::env::var("ANNALS_WORKFLOW_CRASH_DEADLINE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(180),
    );
    let (checked, status) = runtime.block_on(async move {
        let runtime = tokio::time::timeout(deadline, run_child(&path, cycles.saturating_sub(1)))
            .await
            .unwrap_or_else(|_| panic!("the last run did not place its orders within {deadline:?}"));
        let workflow = runtime.workflow("fulfilment").expect("running");
        let finished = tokio::time::timeout(deadline, async {
            loop {
                let status = workflow
                    .wait_for(runtime.store().head_position(), deadline)
                    .await
                    .expect("the workflow catches up");
                if status.running == 0 && status.completed as u64 >= orders {
                    break status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let status = match finished {
            Ok(status) => status,
            Err(_) => {
                let report = stuck_report(&**runtime.store()).await;
                panic!(
                    "the workflow did not finish within {deadline:?}: {:?}\nstuck instances:\n{report}",
                    workflow.status()
                );
            }
        };
        let checked = check(&**runtime.store()).await;
        runtime.shutdown().await.unwrap();
        (checked, status)
    });
    eprintln!(
        "workflow crash details: {checked:?}, failed instances: {:?}",
        status.failed
    );
    println!(
        "workflow_crash cycles={cycles} orders={} completed={} duplicate_commands={} lost_steps={} inconsistent={}",
        checked.orders, checked.shipped, checked.duplicate_commands, checked.lost_steps, checked.inconsistent
    );
    assert_eq!(checked.orders, orders);
    assert_eq!(
        (
            checked.duplicate_commands,
            checked.lost_steps,
            checked.inconsistent
        ),
        (0, 0, 0),
        "{checked:?}"
    );
    assert!(status.failed.is_empty());
    assert!(
        checked.shipped > 0 && checked.cancelled > 0,
        "both paths ran: {checked:?}"
    );
}

/// For a hang: each order neither shipped nor cancelled, with the events of
/// its order, payment and fulfilment streams (for a step: whether it
/// answered a timer, i.e. its causation is itself, and its position).
async fn stuck_report(store: &dyn EventStore) -> String {
    use annals::store::{EventFilter, ReadDirection};
    use annals::{Position, StreamId, Version};
    use std::collections::BTreeMap;
    let mut orders: BTreeMap<String, fulfilment_domain::Order> = BTreeMap::new();
    let mut from = Position(1);
    loop {
        let page = store
            .read_all(
                from,
                ReadDirection::Forward,
                4096,
                &EventFilter::Category("order".to_owned()),
            )
            .await
            .expect("read the log");
        let Some(last) = page.last().map(|e| e.position) else {
            break;
        };
        for event in &page {
            let id = event
                .stream_id
                .as_str()
                .split_once('-')
                .unwrap()
                .1
                .to_owned();
            let decoded: fulfilment_domain::OrderEvent =
                annals::codec::decode_event(event).expect("order event");
            annals::Aggregate::apply(orders.entry(id).or_default(), &decoded);
        }
        from = last.next();
    }
    let checkpoint = store
        .load_checkpoint("workflow:fulfilment")
        .await
        .ok()
        .flatten();
    let mut out = format!("checkpoint {checkpoint:?}\n");
    for (id, order) in orders.iter().filter(|(_, o)| !o.shipped && !o.cancelled) {
        out.push_str(&format!("{id}: {order:?}\n"));
        for category in ["order", "payment", "fulfilment"] {
            let stream = StreamId::for_aggregate(category, id).unwrap();
            let events = store
                .read_stream(&stream, Version(1), ReadDirection::Forward, 1000)
                .await
                .unwrap_or_default();
            for event in events {
                let timer = event.metadata.causation_id == Some(event.event_id);
                out.push_str(&format!(
                    "  {category} v{} at {} {} timer_step={timer}\n",
                    event.version.0, event.position.0, event.event_type
                ));
            }
        }
    }
    out
}
