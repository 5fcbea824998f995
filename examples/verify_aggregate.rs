//! How a service checks its own aggregate type's snapshots: the `annals`
//! tool cannot know a service's types, so the service exposes
//! `annals::ops::verify_aggregate::<Book>` itself (here as an admin
//! command printing JSON; an HTTP handler would return the same report).
//! Every snapshot must equal a full replay of its stream (invariant I5);
//! the example plants a wrong snapshot and shows it caught, and exits
//! non-zero if either check says otherwise.
//!
//! `cargo run --release --example verify_aggregate`

#[path = "library/mod.rs"]
mod library;

use std::sync::Arc;

use annals::ops::{verify_aggregate, AggregateCheck, Inspect};
use annals::store::Snapshot;
use annals::{EventStore, Runtime, RuntimeConfig, SledStore, StreamId};
use library::{Book, BookCommand};

/// The service's admin command: checks every `Book` snapshot and prints the
/// report as one JSON line.
async fn admin_verify_books(store: &dyn Inspect) -> Result<AggregateCheck, annals::ops::OpsError> {
    let check = verify_aggregate::<Book>(store).await?;
    println!(
        "{}",
        serde_json::to_string(&check).expect("a report serializes")
    );
    Ok(check)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let config = RuntimeConfig::builder().snapshot_every(2).build()?;
    let runtime = Runtime::new(Arc::new(SledStore::open(dir.path())?), config);
    let books = runtime.aggregates::<Book>();
    for id in 0..20 {
        let id = id.to_string();
        books.execute(&id, BookCommand::add("Solaris")).await?;
        books.execute(&id, BookCommand::lend("ada")).await?;
        books.execute(&id, BookCommand::Return).await?;
        books.execute(&id, BookCommand::lend("bob")).await?;
    }
    runtime.shutdown().await?;

    let store = SledStore::open(dir.path())?;
    let sound = admin_verify_books(&store).await?;
    // A snapshot that lies: book-7 at version 4 says ada has it (bob does).
    let lie = Book {
        title: Some("Solaris".into()),
        borrower: Some("ada".into()),
    };
    let stream = StreamId::new("book-7")?;
    store.delete_snapshot(&stream).await?;
    let payload = annals::codec::encode_value(&lie)?;
    store
        .save_snapshot(
            &stream,
            Snapshot {
                version: annals::Version(4),
                payload,
            },
        )
        .await?;
    let broken = admin_verify_books(&store).await?;
    store.shutdown().await?;

    // Snapshots are saved in the background, so not every book need have one.
    if !sound.is_sound() || sound.snapshots_checked == 0 {
        return Err(format!("expected sound snapshots: {sound:?}").into());
    }
    match broken.mismatches.as_slice() {
        [mismatch] if mismatch.stream == "book-7" && mismatch.version == 4 => {
            println!("caught: {}: {}", mismatch.stream, mismatch.detail);
        }
        other => return Err(format!("expected book-7 to be caught: {other:?}").into()),
    }
    Ok(())
}
