//! Reset and rebuild from zero: the rebuilt read model equals the first
//! build, for a sled read model and for a typed in-memory one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::codec::encode_event;
use annals::projection::{ProjectionContext, ProjectionError, SledProjection, Typed};
use annals::store::{Durability, EventFilter, ReadModelBatch, SledStoreConfig};
use annals::{
    DomainEvent, EventStore, ExpectedVersion, Position, ProjectionConfig, ProjectionHandle,
    RecordedEvent, SledStore, StreamId, TypedProjection,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
enum OrderEvent {
    OrderPlaced { customer: String, amount: u64 },
    OrderCancelled,
}

impl DomainEvent for OrderEvent {}

const WAIT: Duration = Duration::from_secs(10);

async fn open() -> (tempfile::TempDir, Arc<SledStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SledStore::open_with(SledStoreConfig::new(dir.path()).durability(Durability::Flush))
            .unwrap();
    (dir, Arc::new(store))
}

/// Writes 300 orders (some cancelled) and 50 unrelated events.
async fn write_history(store: &SledStore) -> Position {
    let mut last = Position::START;
    for order in 0..300u64 {
        let stream = StreamId::new(format!("order-{order}")).unwrap();
        let mut events = vec![encode_event(&OrderEvent::OrderPlaced {
            customer: format!("customer-{}", order % 17),
            amount: order * 3 + 1,
        })
        .unwrap()];
        if order % 5 == 0 {
            events.push(encode_event(&OrderEvent::OrderCancelled).unwrap());
        }
        last = store
            .append(&stream, ExpectedVersion::NoStream, events)
            .await
            .unwrap()
            .last_position;
        if order % 6 == 0 {
            let other = StreamId::new(format!("user-{order}")).unwrap();
            let event = annals::NewEvent::new("UserRegistered", Vec::new());
            last = store
                .append(&other, ExpectedVersion::Any, vec![event])
                .await
                .unwrap()
                .last_position;
        }
    }
    last
}

/// Revenue per customer and the open orders, in sled.
struct RevenueModel;

const REVENUE: &str = "rebuild-revenue";
const ORDERS: &str = "rebuild-orders";

impl SledProjection for RevenueModel {
    fn trees(&self) -> Vec<String> {
        vec![REVENUE.into(), ORDERS.into()]
    }

    fn handle(
        &mut self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let order = event.stream_id.as_str();
        match annals::codec::decode_event::<OrderEvent>(event)? {
            OrderEvent::OrderPlaced { customer, amount } => {
                batch.update::<u64>(REVENUE, &customer, |total| total + amount)?;
                batch.put(ORDERS, order, &(amount, customer))?;
            }
            OrderEvent::OrderCancelled => {
                // Cancelled orders earn nothing: take the amount back out.
                let (amount, customer): (u64, String) =
                    batch.get(ORDERS, order)?.expect("placed before cancelled");
                batch.update::<u64>(REVENUE, &customer, |total| total - amount)?;
                batch.remove(ORDERS, order)?;
            }
        }
        Ok(())
    }
}

fn dump(store: &SledStore, tree: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
    store
        .read_model::<[u8], ()>(tree)
        .unwrap()
        .iter_raw()
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_read_model_rebuilt_from_zero_is_the_same() {
    let (_dir, store) = open().await;
    let head = write_history(&store).await;
    let config = ProjectionConfig::builder("revenue")
        .filter(EventFilter::Category("order".into()))
        .batch_size(37);
    let handle =
        ProjectionHandle::spawn_sled(Arc::clone(&store), config.build().unwrap(), RevenueModel)
            .await
            .unwrap();
    handle.wait_for(head, WAIT).await.unwrap();
    let first = (dump(&store, REVENUE), dump(&store, ORDERS));
    assert_eq!(first.0.len(), 17, "one revenue row per customer");
    assert_eq!(first.1.len(), 240, "the orders not cancelled");
    let handled = handle.status().events_handled;
    assert_eq!(handled, 360);

    handle.reset().await.unwrap();
    handle.wait_for(head, WAIT).await.unwrap();
    let status = handle.status();
    assert_eq!(
        status.events_handled, handled,
        "the rebuild handled every event again"
    );
    assert_eq!((dump(&store, REVENUE), dump(&store, ORDERS)), first);
    assert_eq!(handle.shutdown().await.unwrap(), head);
    assert_eq!(store.load_checkpoint("revenue").await.unwrap(), Some(head));
}

/// Revenue per customer in memory, from typed events.
#[derive(Clone, Default)]
struct TypedRevenue {
    revenue: Arc<Mutex<BTreeMap<String, u64>>>,
    orders: Arc<Mutex<BTreeMap<String, (String, u64)>>>,
}

impl TypedProjection for TypedRevenue {
    type Event = OrderEvent;

    async fn handle(
        &mut self,
        event: OrderEvent,
        recorded: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let order = recorded.stream_id.to_string();
        let mut revenue = self.revenue.lock().unwrap();
        let mut orders = self.orders.lock().unwrap();
        match event {
            OrderEvent::OrderPlaced { customer, amount } => {
                *revenue.entry(customer.clone()).or_default() += amount;
                orders.insert(order, (customer, amount));
            }
            OrderEvent::OrderCancelled => {
                let (customer, amount) = orders.remove(&order).expect("placed before cancelled");
                *revenue.get_mut(&customer).unwrap() -= amount;
            }
        }
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), ProjectionError> {
        self.revenue.lock().unwrap().clear();
        self.orders.lock().unwrap().clear();
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_read_model_rebuilt_from_zero_is_the_same() {
    let (_dir, store) = open().await;
    let head = write_history(&store).await;
    let model = TypedRevenue::default();
    let config =
        ProjectionConfig::builder("typed-revenue").filter(EventFilter::Category("order".into()));
    let handle =
        ProjectionHandle::spawn(store.clone(), config.build().unwrap(), Typed(model.clone()))
            .await
            .unwrap();
    handle.wait_for(head, WAIT).await.unwrap();
    let first = model.revenue.lock().unwrap().clone();
    assert_eq!(first.len(), 17);
    let expected_total: u64 = (0..300u64).filter(|o| o % 5 != 0).map(|o| o * 3 + 1).sum();
    assert_eq!(first.values().sum::<u64>(), expected_total);

    handle.reset().await.unwrap();
    handle.wait_for(head, WAIT).await.unwrap();
    assert_eq!(*model.revenue.lock().unwrap(), first);
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_event_is_a_recorded_failure_not_a_silent_skip() {
    let (_dir, store) = open().await;
    let order = StreamId::new("order-1").unwrap();
    let placed = encode_event(&OrderEvent::OrderPlaced {
        customer: "c".into(),
        amount: 5,
    })
    .unwrap();
    let bogus = annals::NewEvent::new("OrderTeleported", Vec::new());
    let last = store
        .append(&order, ExpectedVersion::NoStream, vec![placed, bogus])
        .await
        .unwrap()
        .last_position;
    let model = TypedRevenue::default();
    let config = ProjectionConfig::builder("typed")
        .filter(EventFilter::Category("order".into()))
        .failure_policy(annals::projection::FailurePolicy::SkipAndRecord);
    let handle =
        ProjectionHandle::spawn(store.clone(), config.build().unwrap(), Typed(model.clone()))
            .await
            .unwrap();
    handle.wait_for(last, WAIT).await.unwrap();
    let status = handle.status();
    assert_eq!(status.skipped.len(), 1);
    assert_eq!(status.skipped[0].position, last);
    assert!(
        status.skipped[0].error.contains("OrderTeleported"),
        "{}",
        status.skipped[0].error
    );
    assert_eq!(model.revenue.lock().unwrap().get("c"), Some(&5));
    handle.shutdown().await.unwrap();
}
