//! Appends and reads events on the embedded sled store: the smallest useful
//! program. `cargo run --release --example quickstart [path]`.

use annals::store::{EventFilter, ReadDirection};
use annals::{EventStore, ExpectedVersion, NewEvent, Position, SledStore, StreamId, Version};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = std::env::args()
        .nth(1)
        .map_or_else(|| dir.path().to_path_buf(), Into::into);
    let store = SledStore::open(&path)?;

    let mut appended = 0;
    for order in 0..100 {
        let stream = StreamId::new(format!("order-{order}"))?;
        let events = vec![
            NewEvent::new("OrderPlaced", format!("order {order}").into_bytes()),
            NewEvent::new("OrderShipped", Vec::new()),
        ];
        store
            .append(&stream, ExpectedVersion::NoStream, events)
            .await?;
        appended += 2;
    }

    let stream = StreamId::new("order-7")?;
    let events = store
        .read_stream(&stream, Version::FIRST, ReadDirection::Forward, 10)
        .await?;
    let conflict = store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("OrderPlaced", Vec::new())],
        )
        .await
        .unwrap_err();
    let shipped = store
        .read_all(
            Position::START,
            ReadDirection::Forward,
            usize::MAX,
            &EventFilter::EventTypes(vec!["OrderShipped".into()]),
        )
        .await?;
    println!(
        "appended {appended} events to 100 streams at {}",
        path.display()
    );
    println!(
        "order-7 holds {} events, the last at version {}",
        events.len(),
        events[1].version
    );
    println!("a second OrderPlaced on order-7 is refused: {conflict}");
    println!(
        "{} OrderShipped events in $all, head position {}",
        shipped.len(),
        store.head_position()
    );
    store.shutdown().await?;
    Ok(())
}
