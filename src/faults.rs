//! A fault-injecting [`EventStore`] wrapper for tests: it fails or delays
//! appends, reads and checkpoint writes at random, including the nastiest
//! case, an append that commits but whose acknowledgement is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{AppendError, BackendError, ReadError, StoreError};
use crate::event::{
    AppendResult, EventFilter, ExpectedVersion, NewEvent, Position, ReadDirection, RecordedEvent,
    Snapshot, StreamId, Version,
};
use crate::store::{EventStore, LiveFeed};

/// How often a [`FaultyStore`] misbehaves. Rates are probabilities in 0..=1
/// per call.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct FaultPlan {
    /// An append fails before reaching the store: nothing is written.
    pub append_rejected: f64,
    /// An append is committed, but the caller gets an error: the
    /// acknowledgement is lost, as when a connection drops after a commit.
    pub append_ack_lost: f64,
    /// A read (stream, `$all`, version, snapshot, checkpoint) fails.
    pub read_failed: f64,
    /// A snapshot or checkpoint write fails before reaching the store.
    pub write_failed: f64,
    /// Every call first sleeps a random time up to this.
    pub max_delay: Duration,
    /// Seed of the pseudo-random choices, so that a failing run repeats.
    pub seed: u64,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            append_rejected: 0.1,
            append_ack_lost: 0.05,
            read_failed: 0.05,
            write_failed: 0.1,
            max_delay: Duration::from_millis(2),
            seed: 0x5eed,
        }
    }
}

impl FaultPlan {
    /// No faults and no delay.
    pub fn none() -> Self {
        Self {
            append_rejected: 0.0,
            append_ack_lost: 0.0,
            read_failed: 0.0,
            write_failed: 0.0,
            max_delay: Duration::ZERO,
            seed: 1,
        }
    }
}

/// How many faults a [`FaultyStore`] injected, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultCounts {
    /// Appends failed before the store.
    pub appends_rejected: u64,
    /// Appends committed whose acknowledgement was replaced by an error.
    pub acks_lost: u64,
    /// Reads failed.
    pub reads_failed: u64,
    /// Snapshot and checkpoint writes failed.
    pub writes_failed: u64,
}

/// A failure a [`FaultyStore`] made up. It reaches callers as the source of
/// a [`StoreError::Backend`] naming the backend `"faults"`, inside the usual
/// error types, exactly as a failing disk's error would; tests recognise it
/// with [`InjectedFault::find`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("injected fault: {what}")]
pub struct InjectedFault {
    what: &'static str,
}

impl InjectedFault {
    /// The name [`BackendError`]s of injected faults carry.
    pub const BACKEND: &'static str = "faults";

    /// Which fault: `"append rejected"`, `"acknowledgement lost"`, `"read
    /// failed"` or `"write failed"`.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// The injected fault behind `error` (any of the crate's errors, or
    /// one that wraps them as a source), if it is one.
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a InjectedFault> {
        let mut current = Some(error);
        while let Some(error) = current {
            if let Some(fault) = error.downcast_ref::<InjectedFault>() {
                return Some(fault);
            }
            if let Some(backend) = error.downcast_ref::<BackendError>() {
                if let Some(fault) = backend.downcast_ref::<InjectedFault>() {
                    return Some(fault);
                }
            }
            current = error.source();
        }
        None
    }

    fn error(what: &'static str) -> StoreError {
        StoreError::Backend(BackendError::new(Self::BACKEND, InjectedFault { what }))
    }
}

/// Wraps a store and injects faults by a [`FaultPlan`] until
/// [`FaultyStore::heal`] is called. Injected errors are
/// [`StoreError::Backend`] errors whose source is an [`InjectedFault`],
/// inside the usual error types, so code under test sees what it would see
/// from a failing disk.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn EventStore>,
    plan: FaultPlan,
    active: AtomicBool,
    rng: Mutex<u64>,
    appends_rejected: AtomicU64,
    acks_lost: AtomicU64,
    reads_failed: AtomicU64,
    writes_failed: AtomicU64,
}

impl FaultyStore {
    /// Wraps `inner`; faults start at once.
    pub fn new(inner: Arc<dyn EventStore>, plan: FaultPlan) -> Self {
        Self {
            inner,
            plan,
            active: AtomicBool::new(true),
            rng: Mutex::new(plan.seed.max(1)),
            appends_rejected: AtomicU64::new(0),
            acks_lost: AtomicU64::new(0),
            reads_failed: AtomicU64::new(0),
            writes_failed: AtomicU64::new(0),
        }
    }

    /// Stops injecting faults and delays.
    pub fn heal(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    /// Starts injecting faults again.
    pub fn break_again(&self) {
        self.active.store(true, Ordering::SeqCst);
    }

    /// The faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            appends_rejected: self.appends_rejected.load(Ordering::Relaxed),
            acks_lost: self.acks_lost.load(Ordering::Relaxed),
            reads_failed: self.reads_failed.load(Ordering::Relaxed),
            writes_failed: self.writes_failed.load(Ordering::Relaxed),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn EventStore> {
        &self.inner
    }

    /// A uniform number in 0..1 (xorshift64*: enough for fault choices).
    fn random(&self) -> f64 {
        let mut state = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn strikes(&self, rate: f64, counter: &AtomicU64) -> bool {
        let hit = self.active.load(Ordering::SeqCst) && rate > 0.0 && self.random() < rate;
        if hit {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    async fn delay(&self) {
        if self.active.load(Ordering::SeqCst) && !self.plan.max_delay.is_zero() {
            let delay = self.plan.max_delay.mul_f64(self.random());
            tokio::time::sleep(delay).await;
        }
    }

    async fn read_fault(&self) -> Result<(), StoreError> {
        self.delay().await;
        if self.strikes(self.plan.read_failed, &self.reads_failed) {
            return Err(InjectedFault::error("read failed"));
        }
        Ok(())
    }

    async fn write_fault(&self) -> Result<(), StoreError> {
        self.delay().await;
        if self.strikes(self.plan.write_failed, &self.writes_failed) {
            return Err(InjectedFault::error("write failed"));
        }
        Ok(())
    }
}

#[async_trait]
impl EventStore for FaultyStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError> {
        self.delay().await;
        if self.strikes(self.plan.append_rejected, &self.appends_rejected) {
            return Err(InjectedFault::error("append rejected").into());
        }
        let result = self.inner.append(stream, expected, events).await?;
        if self.strikes(self.plan.append_ack_lost, &self.acks_lost) {
            return Err(InjectedFault::error("acknowledgement lost").into());
        }
        Ok(result)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.read_fault().await?;
        self.inner.read_stream(stream, from, direction, limit).await
    }

    async fn read_event(&self, event_id: uuid::Uuid) -> Result<Option<RecordedEvent>, ReadError> {
        self.read_fault().await?;
        self.inner.read_event(event_id).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError> {
        self.read_fault().await?;
        self.inner.stream_version(stream).await
    }

    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.read_fault().await?;
        self.inner.read_all(from, direction, limit, filter).await
    }

    fn head_position(&self) -> Position {
        self.inner.head_position()
    }

    fn subscribe_live(&self) -> LiveFeed {
        self.inner.subscribe_live()
    }

    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError> {
        self.write_fault().await?;
        self.inner.save_snapshot(stream, snapshot).await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError> {
        self.read_fault().await?;
        self.inner.load_snapshot(stream).await
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError> {
        self.write_fault().await?;
        self.inner.delete_snapshot(stream).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.write_fault().await?;
        self.inner.save_checkpoint(name, position).await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError> {
        self.read_fault().await?;
        self.inner.load_checkpoint(name).await
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.shutdown().await
    }

    async fn lease_checkpoint(
        &self,
        name: &str,
    ) -> Result<Option<crate::store::CheckpointLease>, StoreError> {
        self.inner.lease_checkpoint(name).await
    }

    fn shared_by_processes(&self) -> bool {
        self.inner.shared_by_processes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn faults_strike_at_about_their_rate_and_stop_when_healed() {
        let memory: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        let plan = FaultPlan {
            append_rejected: 0.3,
            append_ack_lost: 0.2,
            max_delay: Duration::ZERO,
            ..FaultPlan::default()
        };
        let store = FaultyStore::new(Arc::clone(&memory), plan);
        let stream = StreamId::new("s-1").unwrap();
        let mut acknowledged = 0u64;
        for _ in 0..1000 {
            let event = NewEvent::new("Happened", vec![1]);
            if store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .is_ok()
            {
                acknowledged += 1;
            }
        }
        let counts = store.counts();
        assert!((200..400).contains(&counts.appends_rejected), "{counts:?}");
        assert!((80..220).contains(&counts.acks_lost), "{counts:?}");
        // A lost acknowledgement still committed: the store holds more than
        // was acknowledged, exactly by the lost ones.
        let stored = memory.stream_version(&stream).await.unwrap().0;
        assert_eq!(stored, acknowledged + counts.acks_lost);
        assert_eq!(stored + counts.appends_rejected, 1000);

        // A failure is an injected fault, recognisable as one through the
        // usual error types.
        let mut failed = None;
        for _ in 0..1000 {
            if let Err(error) = store.stream_version(&stream).await {
                failed = Some(error);
                break;
            }
        }
        let error = failed.expect("5% of reads fail");
        let fault = InjectedFault::find(&error).expect("an injected fault");
        assert_eq!(fault.what(), "read failed");
        assert_eq!(error.to_string(), "faults: injected fault: read failed");
        assert!(
            matches!(&error, ReadError::Store(StoreError::Backend(b)) if b.backend() == "faults")
        );
        let not_injected = ReadError::Store(StoreError::Closed);
        assert!(InjectedFault::find(&not_injected).is_none());

        store.heal();
        for _ in 0..100 {
            let event = NewEvent::new("Happened", vec![1]);
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
        }
    }
}
