//! # annals
//!
//! Event-sourced aggregates for tokio services: a durable, group-committed
//! event log on sled, with an in-memory twin for tests, and projections that
//! follow it: [`subscribe`](projection::subscribe) delivers every committed event once, in order,
//! and a [`ProjectionHandle`] runs a read model with a durable checkpoint
//! (exactly once for a [`SledProjection`](projection::SledProjection) kept in the store's database).
//!
//! ```
//! use annals::{EventStore, ExpectedVersion, NewEvent, SledStore, StreamId, Version};
//! use annals::store::ReadDirection;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = SledStore::open(dir.path())?;
//! let order = StreamId::new("order-42")?;
//!
//! // Acknowledged only once on disk (fdatasync), with version 1 and position 1.
//! let appended = store
//!     .append(&order, ExpectedVersion::NoStream, vec![NewEvent::new("OrderPlaced", b"...".to_vec())])
//!     .await?;
//! assert_eq!(appended.last_version, Version(1));
//!
//! let events = store.read_stream(&order, Version::FIRST, ReadDirection::Forward, 100).await?;
//! assert_eq!(events[0].event_type, "OrderPlaced");
//! store.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Aggregates on the runtime
//!
//! An [`Aggregate`] decides in `handle` and evolves in `apply`; the
//! [`Runtime`] hosts each instance in its own actor, one command at a time.
//!
//! ```
//! use std::sync::Arc;
//! use annals::{Aggregate, CommandError, DomainEvent, MemoryStore, Runtime, RuntimeConfig};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! enum AccountEvent { Deposited { amount: u64 }, Withdrawn { amount: u64 } }
//! impl DomainEvent for AccountEvent {}
//!
//! #[derive(Debug)]
//! enum AccountCommand { Deposit(u64), Withdraw(u64) }
//!
//! // A hand-written error: the domain needs no extra crate.
//! #[derive(Debug)]
//! struct InsufficientFunds;
//! impl std::fmt::Display for InsufficientFunds {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         f.write_str("insufficient funds")
//!     }
//! }
//! impl std::error::Error for InsufficientFunds {}
//!
//! #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! struct Account { balance: u64 }
//!
//! impl Aggregate for Account {
//!     type Command = AccountCommand;
//!     type Event = AccountEvent;
//!     type Error = InsufficientFunds;
//!     const CATEGORY: &'static str = "account";
//!
//!     fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, InsufficientFunds> {
//!         match *command {
//!             AccountCommand::Deposit(amount) => Ok(vec![AccountEvent::Deposited { amount }]),
//!             AccountCommand::Withdraw(amount) if amount > self.balance => Err(InsufficientFunds),
//!             AccountCommand::Withdraw(amount) => Ok(vec![AccountEvent::Withdrawn { amount }]),
//!         }
//!     }
//!
//!     fn apply(&mut self, event: &AccountEvent) {
//!         match event {
//!             AccountEvent::Deposited { amount } => self.balance += amount,
//!             AccountEvent::Withdrawn { amount } => self.balance -= amount,
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = Runtime::new(Arc::new(MemoryStore::new()), RuntimeConfig::default());
//! let accounts = runtime.aggregates::<Account>();
//! let executed = accounts.execute("7", AccountCommand::Deposit(100)).await?;
//! assert_eq!(executed.version.0, 1); // stored in stream `account-7`
//! let refused = accounts.execute("7", AccountCommand::Withdraw(500)).await;
//! assert!(matches!(refused, Err(CommandError::Domain(InsufficientFunds))));
//! assert_eq!(accounts.state("7").await?.balance, 100);
//! runtime.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod aggregate;
pub mod codec;
mod error;
mod event;
mod faults;
pub mod metrics;
pub mod ops;
pub mod projection;
pub mod runtime;
pub mod store;
pub mod testing;
mod umbrella;
pub mod workflow;

// What most users need; everything else is in its layer's namespace.
pub use crate::codec::DomainEvent;
pub use crate::error::InvalidInput;
pub use crate::projection::{Projection, ProjectionConfig, ProjectionHandle, TypedProjection};
pub use crate::runtime::{
    Aggregate, Aggregates, CommandContext, CommandError, Executed, QueryError, Runtime,
    RuntimeConfig,
};
pub use crate::store::{
    EventStore, ExpectedVersion, MemoryStore, NewEvent, Position, RecordedEvent, SledStore,
    StoreError, StreamId, Version,
};
pub use crate::umbrella::Error;
