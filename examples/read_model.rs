//! A projection keeping a typed read model, loans per member, in the sled
//! store's own database: each batch is committed with the projection's
//! checkpoint, so every event counts exactly once. The runtime owns the
//! projection (`Runtime::adopt`): its `shutdown` catches it up to the last
//! command and saves the checkpoint before closing the store. The read model
//! is then queried, typed, with `SledStore::read_model::<K, V>(tree)`.
//!
//! `cargo run --release --example read_model`

#[path = "library/mod.rs"]
mod library;

use std::sync::Arc;

use annals::projection::{ProjectionContext, ProjectionError, Typed, TypedSledProjection};
use annals::store::{EventFilter, ReadModelBatch};
use annals::{EventStore, ProjectionConfig, ProjectionHandle, RecordedEvent, Runtime, SledStore};
use library::{Book, BookCommand, BookEvent};

/// The tree: member -> how many books they have on loan now (u64).
const LOANS: &str = "loans-per-member";

struct LoansPerMember;

impl TypedSledProjection for LoansPerMember {
    type Event = BookEvent;

    fn trees(&self) -> Vec<String> {
        vec![LOANS.into()]
    }

    fn handle(
        &mut self,
        event: BookEvent,
        _: &RecordedEvent,
        batch: &mut ReadModelBatch,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        match event {
            BookEvent::BookLent { member } => batch.update::<u64>(LOANS, &member, |n| n + 1)?,
            BookEvent::BookReturned { member } => batch.update::<u64>(LOANS, &member, |n| n - 1)?,
            BookEvent::BookAdded { .. } => return Ok(()),
        };
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::open(dir.path())?;
    let config = ProjectionConfig::builder("loans-per-member")
        .filter(EventFilter::Category("book".into()))
        .build()?;
    let projection =
        ProjectionHandle::spawn_sled(Arc::clone(runtime.store()), config, Typed(LoansPerMember))
            .await?;
    runtime
        .adopt(projection)
        .map_err(|_| "the runtime is shutting down")?;

    let books = runtime.aggregates::<Book>();
    for (book, member) in [("1", "ada"), ("2", "ada"), ("3", "bob"), ("4", "cy")] {
        books.execute(book, BookCommand::add("A Title")).await?;
        books.execute(book, BookCommand::lend(member)).await?;
    }
    books.execute("3", BookCommand::Return).await?;
    // The projection has handled every event and saved its checkpoint by now.
    runtime.shutdown().await?;

    // Reopen the directory: the read model is durable, next to the log.
    let store = SledStore::open(dir.path())?;
    let loans = store.read_model::<String, u64>(LOANS)?;
    let all = loans.iter()?;
    println!("loans per member: {all:?}");
    assert_eq!(loans.get(&"ada".to_owned())?, Some(2));
    assert_eq!(loans.get(&"bob".to_owned())?, Some(0));
    assert_eq!(all.len(), 3);
    println!("all checks passed");
    store.shutdown().await?;
    Ok(())
}
