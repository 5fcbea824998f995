//! Shared by the runtime tests: a small ledger domain with rules (and
//! commands that panic on purpose), and a store wrapper that counts reads,
//! holds appends at a gate, or plays another writer.

#![allow(dead_code, unreachable_pub)]

pub mod child;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use annals::codec::encode_event;
use annals::store::{
    AppendError, AppendResult, EventFilter, LiveFeed, ReadDirection, ReadError, Snapshot,
};
use annals::{
    Aggregate, DomainEvent, EventStore, ExpectedVersion, MemoryStore, NewEvent, Position,
    RecordedEvent, StoreError, StreamId, Version,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerEvent {
    Opened,
    Deposited {
        amount: u64,
    },
    Withdrawn {
        amount: u64,
    },
    Noted {
        seq: u64,
    },
    /// `apply` panics on it: a bug in the user's code.
    Poisoned,
}

impl DomainEvent for LedgerEvent {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerCommand {
    Open,
    Deposit(u64),
    Withdraw(u64),
    Note(u64),
    /// Deposits `amount` twice in one command (two events, one append).
    DepositTwice(u64),
    Nothing,
    PanicInHandle,
    EmitPoison,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("the ledger is not open")]
    NotOpen,
    #[error("the ledger is already open")]
    AlreadyOpen,
    #[error("insufficient funds: balance {balance}, asked {asked}")]
    InsufficientFunds { balance: u64, asked: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub open: bool,
    pub balance: u64,
    pub notes: Vec<u64>,
    pub events: u64,
}

impl Aggregate for Ledger {
    type Command = LedgerCommand;
    type Event = LedgerEvent;
    type Error = LedgerError;
    const CATEGORY: &'static str = "ledger";

    fn handle(&self, command: &LedgerCommand) -> Result<Vec<LedgerEvent>, LedgerError> {
        use LedgerCommand as C;
        if !self.open && !matches!(command, C::Open | C::PanicInHandle | C::EmitPoison) {
            return Err(LedgerError::NotOpen);
        }
        Ok(match *command {
            C::Open if self.open => return Err(LedgerError::AlreadyOpen),
            C::Open => vec![LedgerEvent::Opened],
            C::Deposit(amount) => vec![LedgerEvent::Deposited { amount }],
            C::DepositTwice(amount) => vec![LedgerEvent::Deposited { amount }; 2],
            C::Withdraw(asked) if asked > self.balance => {
                return Err(LedgerError::InsufficientFunds {
                    balance: self.balance,
                    asked,
                })
            }
            C::Withdraw(amount) => vec![LedgerEvent::Withdrawn { amount }],
            C::Note(seq) => vec![LedgerEvent::Noted { seq }],
            C::Nothing => vec![],
            C::PanicInHandle => panic!("handle panicked on purpose"),
            C::EmitPoison => vec![LedgerEvent::Poisoned],
        })
    }

    fn apply(&mut self, event: &LedgerEvent) {
        self.events += 1;
        match event {
            LedgerEvent::Opened => self.open = true,
            LedgerEvent::Deposited { amount } => self.balance += amount,
            LedgerEvent::Withdrawn { amount } => self.balance -= amount,
            LedgerEvent::Noted { seq } => self.notes.push(*seq),
            LedgerEvent::Poisoned => panic!("apply panicked on purpose"),
        }
    }
}

/// Runs `commands` through `handle`/`apply` with no runtime: the model.
pub fn model(commands: &[LedgerCommand]) -> Ledger {
    let mut ledger = Ledger::default();
    for command in commands {
        if let Ok(events) = ledger.handle(command) {
            for event in &events {
                ledger.apply(event);
            }
        }
    }
    ledger
}

/// Appends `event` to `stream` directly on the store, as another writer.
pub async fn outside_append(
    store: &dyn EventStore,
    stream: &str,
    event: LedgerEvent,
) -> AppendResult {
    let stream = StreamId::new(stream).unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![encode_event(&event).unwrap()],
        )
        .await
        .unwrap()
}

/// Opens the sled store at `path` again after its runtime or store was
/// shut down (which frees the directory; `SledStore::open` also waits for
/// a lock sled is still releasing).
pub async fn reopen_sled(path: &std::path::Path) -> annals::SledStore {
    annals::SledStore::open(path).unwrap_or_else(|error| panic!("{error}"))
}

/// A [`MemoryStore`] with instruments.
#[derive(Debug)]
pub struct TestStore {
    pub inner: MemoryStore,
    /// `load_snapshot` calls per stream: one per actor start.
    pub snapshot_loads: Mutex<HashMap<String, usize>>,
    /// Events returned by `read_stream`.
    pub events_read: AtomicUsize,
    /// Append attempts (including refused ones).
    pub appends: AtomicU64,
    /// When set, every append first waits for a permit.
    pub gate: Option<Arc<Semaphore>>,
    /// When set, another writer appends a `Noted` event to the stream just
    /// before each append, so every append conflicts.
    pub interfere: AtomicBool,
    /// When set, `load_snapshot` (the start of every recovery) takes this long.
    pub load_delay: Option<std::time::Duration>,
}

impl TestStore {
    pub fn new() -> Self {
        Self {
            inner: MemoryStore::new(),
            snapshot_loads: Mutex::default(),
            events_read: AtomicUsize::new(0),
            appends: AtomicU64::new(0),
            gate: None,
            interfere: AtomicBool::new(false),
            load_delay: None,
        }
    }

    pub fn gated(gate: Arc<Semaphore>) -> Self {
        Self {
            gate: Some(gate),
            ..Self::new()
        }
    }

    pub fn loads_of(&self, stream: &str) -> usize {
        self.snapshot_loads
            .lock()
            .unwrap()
            .get(stream)
            .copied()
            .unwrap_or(0)
    }
}

#[async_trait]
impl EventStore for TestStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        if self.interfere.load(Ordering::SeqCst) {
            let foreign = encode_event(&LedgerEvent::Noted { seq: 999 }).unwrap();
            self.inner
                .append(stream, ExpectedVersion::Any, vec![foreign])
                .await?;
        }
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let events = self
            .inner
            .read_stream(stream, from, direction, limit)
            .await?;
        self.events_read.fetch_add(events.len(), Ordering::SeqCst);
        Ok(events)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError> {
        self.inner.stream_version(stream).await
    }

    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.inner.read_all(from, direction, limit, filter).await
    }

    fn head_position(&self) -> Position {
        self.inner.head_position()
    }

    fn subscribe_live(&self) -> LiveFeed {
        self.inner.subscribe_live()
    }

    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(stream, snapshot).await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError> {
        *self
            .snapshot_loads
            .lock()
            .unwrap()
            .entry(stream.to_string())
            .or_default() += 1;
        if let Some(delay) = self.load_delay {
            tokio::time::sleep(delay).await;
        }
        self.inner.load_snapshot(stream).await
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError> {
        self.inner.delete_snapshot(stream).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.inner.save_checkpoint(name, position).await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError> {
        self.inner.load_checkpoint(name).await
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.shutdown().await
    }
}

/// The setting `name` from the environment (a case count, a number of
/// kills), or `default` when it is unset or does not parse.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Every event of `$all`, in order.
pub async fn whole_log(store: &dyn EventStore) -> Vec<RecordedEvent> {
    store
        .read_all(
            Position::START,
            ReadDirection::Forward,
            usize::MAX,
            &EventFilter::All,
        )
        .await
        .expect("read $all")
}

/// Every event of `id`, in order.
pub async fn whole_stream(store: &dyn EventStore, id: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_stream(id, Version::FIRST, ReadDirection::Forward, usize::MAX)
        .await
        .expect("read stream")
}

/// Retries `attempt` for up to a second while the previous session still
/// holds sled's file lock. sled 0.34 releases it a few milliseconds after
/// its last handle is dropped (its I/O thread pool still holds the file);
/// measured 3 to 10 ms with raw sled alone. `SledStore::shutdown` waits for
/// that itself; a plain drop, a raw sled database or a child process that
/// just exited do not.
pub fn until_unlocked<T, E: std::fmt::Display>(
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match attempt() {
            Err(e)
                if (e.to_string().contains("could not acquire lock")
                    || e.to_string().contains("is in use"))
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            result => return result,
        }
    }
}
