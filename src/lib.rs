//! # annals
//!
//! Event-sourced aggregates for tokio services: a durable, group-committed
//! event log on sled, with an in-memory twin for tests, and projections that
//! follow it: [`subscribe`] delivers every committed event once, in order,
//! and a [`ProjectionHandle`] runs a read model with a durable checkpoint
//! (exactly once for a [`SledProjection`] kept in the store's database).
//!
//! ```
//! use annals::{EventStore, ExpectedVersion, NewEvent, ReadDirection, SledStore, StreamId, Version};
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
mod codec;
mod error;
mod event;
mod faults;
mod projection;
mod runtime;
mod store;
mod testing;
pub(crate) mod workflow;

pub use crate::aggregate::Aggregate;
pub use crate::codec::{
    decode_event, decode_event_parts, decode_value, encode_event, encode_value, event_type_of,
    DomainEvent, Upcasters,
};
pub use crate::error::{
    AppendError, BackendError, CategoryError, CodecError, CommandError, Error, InvalidInput,
    ProjectionControlError, ProjectionError, QueryError, ReadError, ReadModelError, StoreError,
    SubscriptionError,
};
pub use crate::event::{
    AppendResult, EventFilter, ExpectedVersion, Metadata, NewEvent, Position, ReadDirection,
    RecordedEvent, Snapshot, StreamId, Version, DEFAULT_MAX_EVENT_SIZE, MAX_EVENTS_PER_APPEND,
    MAX_EVENT_TYPE_LEN, MAX_STREAM_ID_LEN,
};
pub use crate::faults::{FaultCounts, FaultPlan, FaultyStore, InjectedFault};
pub use crate::projection::{
    subscribe, FailurePolicy, Projection, ProjectionConfig, ProjectionConfigBuilder,
    ProjectionContext, ProjectionFailure, ProjectionHandle, ProjectionState, ProjectionStatus,
    ReadModel, ReadModelBatch, ReadModelView, SkippedEvent, SledProjection, Subscription, Typed,
    TypedProjection, TypedSledProjection, DEFAULT_PAGE_SIZE,
};
pub use crate::runtime::{
    AggregateSettings, Aggregates, CommandContext, Executed, Runtime, RuntimeConfig,
    RuntimeConfigBuilder, RuntimeStore,
};
pub use crate::store::memory::MemoryStore;
pub use crate::store::postgres::{
    PostgresConfig, PostgresStats, PostgresStore, MAX_SCHEMA_NAME_LEN, POSTGRES_FORMAT_VERSION,
};
pub use crate::store::sled::{Durability, SledStore, SledStoreConfig, StoreStats, FORMAT_VERSION};
pub use crate::store::{
    Commit, EventStore, FeedError, FromKey, Key, LiveFeed, ReadModelStore, Unordered,
    DEFAULT_LIVE_FEED_CAPACITY, MAX_CHECKPOINT_NAME_LEN,
};
// The backend SPI: what a store written outside the crate needs to keep
// the contract of `EventStore` (the lead moves these under `annals::store`).
pub use crate::event::validate_append;
pub use crate::store::{
    check_idempotency, validate_checkpoint_name, validate_limit, IdempotencyCheck, LivePublisher,
    StoredId,
};
pub use crate::testing::{
    AggregateTest, AggregateTestResult, ProjectionTest, ProjectionTestResult,
};
// The relay's items move into `annals::workflow` when the namespaces are laid out.
pub use crate::workflow::{
    subject_token, EventSink, JetStreamError, JetStreamSink, JetStreamStream, Relay, RelayConfig,
    RelayError, RelayState, RelayStatus, HEADER_CAUSATION_ID, HEADER_CORRELATION_ID,
    HEADER_EVENT_TYPE, HEADER_MESSAGE_ID, HEADER_POSITION, HEADER_RECORDED_AT_MICROS,
    HEADER_SCHEMA_VERSION, HEADER_STREAM_ID, HEADER_VERSION, RELAY_CHECKPOINT_PREFIX,
};
