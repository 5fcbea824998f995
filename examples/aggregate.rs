//! An aggregate run through the runtime on the sled store: a library
//! `Book` (defined in `examples/library/mod.rs`) that the runtime hosts in
//! one actor per book. Shows a command the domain refuses,
//! `execute_returning_state` (the new state without a second round trip)
//! and `try_state` (does this book exist?, without starting an actor).
//!
//! `cargo run --release --example aggregate`

#[path = "library/mod.rs"]
mod library;

use annals::{CommandError, Runtime};
use library::{Book, BookCommand, LoanError};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // One setup for everything: the runtime over a sled store in `dir`.
    let runtime = Runtime::open(dir.path())?;
    let books = runtime.aggregates::<Book>();

    let title = "The Left Hand of Darkness";
    let added = books.execute("42", BookCommand::add(title)).await?;
    println!("book-42 added at version {}", added.version);

    // The state after the command comes back with it.
    let lent = books
        .execute_returning_state("42", BookCommand::lend("ada"))
        .await?;
    let book = lent.state.ok_or("execute_returning_state gave no state")?;
    println!(
        "book-42 at version {} is on loan to {:?}",
        lent.version, book.borrower
    );

    // The domain says no: a typed error, and nothing is stored.
    let refused = books.execute("42", BookCommand::lend("bob")).await;
    match &refused {
        Err(CommandError::Domain(error)) => println!("lending it to bob is refused: {error}"),
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }

    // Once ada returns it, bob may borrow it.
    books.execute("42", BookCommand::Return).await?;
    books.execute("42", BookCommand::lend("bob")).await?;

    // `try_state` answers `None` for a book that never had an event.
    let missing = books.try_state("7").await?;
    println!("book-7 exists: {}", missing.is_some());
    let stored = books.try_state("42").await?;
    runtime.shutdown().await?;

    assert_eq!(added.version.0, 1);
    assert_eq!(lent.version.0, 2);
    assert_eq!(book.borrower.as_deref(), Some("ada"));
    assert!(matches!(
        refused,
        Err(CommandError::Domain(LoanError::OnLoan { to })) if to == "ada"
    ));
    assert_eq!(missing, None);
    assert_eq!(
        stored.and_then(|book| book.borrower).as_deref(),
        Some("bob")
    );
    println!("all checks passed");
    Ok(())
}
