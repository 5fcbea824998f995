//! Read-your-writes: a command returns the global position of its last
//! event; `ProjectionHandle::wait_for(position, timeout)` returns once the
//! projection has handled it, so the read model read next shows the write.
//! The read model here maps each book on loan to its borrower.
//!
//! `cargo run --release --example read_your_writes`

#[path = "library/mod.rs"]
mod library;

use std::{sync::Arc, time::Duration};

use annals::projection::{ProjectionContext, ProjectionError, Typed, TypedSledProjection};
use annals::store::{EventFilter, ReadModelBatch};
use annals::{ProjectionConfig, ProjectionHandle, RecordedEvent, Runtime};
use library::{Book, BookCommand, BookEvent};

/// The tree: book id (`42` of `book-42`) -> the member who has it.
const ON_LOAN: &str = "books-on-loan";

struct BooksOnLoan;

impl TypedSledProjection for BooksOnLoan {
    type Event = BookEvent;

    fn trees(&self) -> Vec<String> {
        vec![ON_LOAN.into()]
    }

    fn handle(
        &mut self,
        event: BookEvent,
        recorded: &RecordedEvent,
        batch: &mut ReadModelBatch,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let book = recorded.stream_id.as_str().trim_start_matches("book-");
        match event {
            BookEvent::BookLent { member } => batch.put(ON_LOAN, book, &member),
            BookEvent::BookReturned { .. } => batch.remove(ON_LOAN, book),
            BookEvent::BookAdded { .. } => Ok(()),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::open(dir.path())?;
    let config = ProjectionConfig::builder("books-on-loan")
        .filter(EventFilter::Category("book".into()))
        .build()?;
    let store = Arc::clone(runtime.store());
    let on_loan = ProjectionHandle::spawn_sled(store.clone(), config, Typed(BooksOnLoan)).await?;
    runtime
        .adopt(on_loan.clone())
        .map_err(|_| "the runtime is shutting down")?;
    let books = runtime.aggregates::<Book>();
    let view = store.read_model::<str, String>(ON_LOAN)?;

    books.execute("42", BookCommand::add("Kindred")).await?;
    let lent = books.execute("42", BookCommand::lend("ada")).await?;
    // Wait for the projection to reach the command's position, then read.
    let position = lent.position.ok_or("the loan stored no event")?;
    on_loan.wait_for(position, Duration::from_secs(5)).await?;
    let borrower = view.get("42")?;
    println!("after the loan (position {position}): book 42 is with {borrower:?}");

    let returned = books.execute("42", BookCommand::Return).await?;
    let position = returned.position.ok_or("the return stored no event")?;
    on_loan.wait_for(position, Duration::from_secs(5)).await?;
    let after_return = view.get("42")?;
    println!("after the return (position {position}): book 42 is with {after_return:?}");
    runtime.shutdown().await?;

    assert_eq!(borrower.as_deref(), Some("ada"));
    assert_eq!(after_return, None);
    println!("all checks passed");
    Ok(())
}
