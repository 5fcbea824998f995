//! Read models kept in the store's own sled database, applied exactly once:
//! the handler stages its writes in a [`ReadModelBatch`] (reads see the
//! batch's own writes), and the runtime commits a whole batch of events'
//! writes together with the checkpoint in one multi-tree sled transaction.
//! The handler runs outside any sled lock; the transaction only copies the
//! staged writes, so a slow handler never holds up the store's writer.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use async_trait::async_trait;
use sled::transaction::{TransactionError, Transactional};
use sled::IVec;

use crate::error::{InvalidInput, ProjectionControlError, ProjectionError, StoreError};
use crate::event::{Position, RecordedEvent};
use crate::projection::actor::{panic_message, Applied, Runner, SaveCheckpoint};
use crate::projection::ProjectionContext;
use crate::store::sled::{sled_error, SledStore};

/// Names the store keeps for its own trees; read-model trees may not start
/// with them.
/// The store's tree of checkpoints (name -> big-endian u64 position).
const CHECKPOINTS: &str = "checkpoints";

const RESERVED_TREE_PREFIXES: [&str; 4] = ["log", "snapshots", "checkpoints", "__sled"];

/// A projection whose read model lives in trees of the
/// [`SledStore`](crate::SledStore)'s database, applied exactly once.
///
/// Run it with [`ProjectionHandle::spawn_sled`](crate::ProjectionHandle::spawn_sled).
/// Keep all of the read model's state in its trees: staged writes of a
/// failed or crashed batch are thrown away, fields of `self` are not rolled
/// back. Nothing else may write to these trees while the projection runs.
/// Readers open the same trees with
/// [`SledStore::database`](crate::SledStore::database) and see every batch
/// once it is committed (after
/// [`ProjectionHandle::wait_for`](crate::ProjectionHandle::wait_for)).
pub trait SledProjection: Send + 'static {
    /// The names of the trees the read model writes, opened (created if
    /// missing) at start. Names may not start with `log`, `snapshots`,
    /// `checkpoints` or `__sled`, which belong to the store and to sled.
    fn trees(&self) -> Vec<String>;

    /// Stages the writes for one event. An error (or a panic) discards this
    /// event's writes and is handled by the failure policy.
    ///
    /// # Errors
    /// Whatever the read model decides; [`ProjectionError::UnknownTree`]
    /// from `batch` for a tree not listed by [`SledProjection::trees`].
    fn handle(
        &mut self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch<'_>,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError>;

    /// Called first when a reset starts, before the trees are erased, for
    /// any state kept outside them (caches). Default: nothing.
    ///
    /// # Errors
    /// Whatever the read model decides. An error (or a panic) fails the
    /// reset with nothing erased: the projection goes on where it was.
    fn reset(&mut self) -> Result<(), ProjectionError> {
        Ok(())
    }
}

/// Staged writes per tree: `Some(value)` to insert, `None` to remove.
type Staged = Vec<BTreeMap<Vec<u8>, Option<IVec>>>;

/// The read model as one event's handler sees it: the trees as committed,
/// plus the writes staged by earlier events of the batch and by this one.
pub struct ReadModelBatch<'a> {
    trees: &'a [(String, sled::Tree)],
    batch: &'a Staged,
    event: Staged,
}

impl std::fmt::Debug for ReadModelBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadModelBatch")
            .field(
                "trees",
                &self.trees.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            )
            .field(
                "staged_writes",
                &self.event.iter().map(BTreeMap::len).sum::<usize>(),
            )
            .finish()
    }
}

impl ReadModelBatch<'_> {
    fn index(&self, tree: &str) -> Result<usize, ProjectionError> {
        self.trees
            .iter()
            .position(|(name, _)| name == tree)
            .ok_or_else(|| ProjectionError::UnknownTree(tree.to_owned()))
    }

    /// The value of `key` in `tree`, including writes staged earlier in
    /// this batch.
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`], or [`ProjectionError::Store`] when
    /// sled fails.
    pub fn get(&self, tree: &str, key: impl AsRef<[u8]>) -> Result<Option<IVec>, ProjectionError> {
        let index = self.index(tree)?;
        let key = key.as_ref();
        if let Some(staged) = self.event[index].get(key) {
            return Ok(staged.clone());
        }
        if let Some(staged) = self.batch[index].get(key) {
            return Ok(staged.clone());
        }
        Ok(self.trees[index].1.get(key).map_err(sled_error)?)
    }

    /// Whether `key` is in `tree`, including staged writes.
    ///
    /// # Errors
    /// As [`ReadModelBatch::get`].
    pub fn contains_key(&self, tree: &str, key: impl AsRef<[u8]>) -> Result<bool, ProjectionError> {
        Ok(self.get(tree, key)?.is_some())
    }

    /// Stages `key = value` in `tree`; committed with the batch.
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`].
    pub fn insert(
        &mut self,
        tree: &str,
        key: impl AsRef<[u8]>,
        value: impl Into<IVec>,
    ) -> Result<(), ProjectionError> {
        let index = self.index(tree)?;
        self.event[index].insert(key.as_ref().to_vec(), Some(value.into()));
        Ok(())
    }

    /// Stages the removal of `key` from `tree`; committed with the batch.
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`].
    pub fn remove(&mut self, tree: &str, key: impl AsRef<[u8]>) -> Result<(), ProjectionError> {
        let index = self.index(tree)?;
        self.event[index].insert(key.as_ref().to_vec(), None);
        Ok(())
    }
}

/// Runs a [`SledProjection`].
pub(crate) struct SledRunner<P> {
    store: Arc<SledStore>,
    name: Arc<str>,
    projection: P,
    trees: Vec<(String, sled::Tree)>,
    /// The checkpoint as stored in the checkpoints tree (maybe not yet
    /// durable).
    stored: Position,
}

impl<P: SledProjection> SledRunner<P> {
    /// Opens the projection's trees and reads its checkpoint.
    pub(crate) fn open(
        store: Arc<SledStore>,
        name: Arc<str>,
        projection: P,
    ) -> Result<(Self, Position), ProjectionControlError> {
        let mut trees = Vec::new();
        for tree in projection.trees() {
            if tree.is_empty() {
                return Err(InvalidInput::EmptyName {
                    what: "read-model tree name",
                }
                .into());
            }
            if RESERVED_TREE_PREFIXES
                .iter()
                .any(|reserved| tree.starts_with(reserved))
            {
                return Err(InvalidInput::ReservedName {
                    what: "read-model tree name",
                    name: tree,
                }
                .into());
            }
            let opened = store.tree(&tree)?;
            trees.push((tree, opened));
        }
        let stored = match store
            .tree(CHECKPOINTS)?
            .get(name.as_bytes())
            .map_err(sled_error)?
        {
            Some(bytes) => Position(u64::from_be_bytes(bytes.as_ref().try_into().map_err(
                |_| StoreError::Corrupt(format!("checkpoint {name:?} is not 8 bytes")),
            )?)),
            None => Position::START,
        };
        let runner = Self {
            store,
            name,
            projection,
            trees,
            stored,
        };
        Ok((runner, stored))
    }

    /// Commits the staged writes and the checkpoint in one transaction.
    fn commit(&mut self, staged: &Staged, position: Position) -> Result<(), StoreError> {
        let checkpoints = self.store.tree(CHECKPOINTS)?;
        let mut trees: Vec<&sled::Tree> = self.trees.iter().map(|(_, tree)| tree).collect();
        trees.push(&checkpoints);
        let name = self.name.as_bytes();
        let checkpoint = position.0.to_be_bytes();
        // The closure may run again on a conflict, so it only copies.
        let result: Result<(), TransactionError<()>> = trees.as_slice().transaction(|views| {
            for (view, writes) in views.iter().zip(staged) {
                for (key, value) in writes {
                    match value {
                        Some(value) => view.insert(key.as_slice(), value.clone())?,
                        None => view.remove(key.as_slice())?,
                    };
                }
            }
            views[views.len() - 1].insert(name, &checkpoint[..])?;
            Ok(())
        });
        match result {
            Ok(()) => {
                self.stored = position;
                Ok(())
            }
            Err(TransactionError::Storage(error)) => Err(sled_error(error)),
            Err(TransactionError::Abort(())) => Err(StoreError::Corrupt(
                "read-model transaction aborted without a reason".to_owned(),
            )),
        }
    }
}

#[async_trait]
impl<P: SledProjection> Runner for SledRunner<P> {
    async fn apply(&mut self, events: &[RecordedEvent], attempt: u32) -> Applied {
        let mut staged: Staged = vec![BTreeMap::new(); self.trees.len()];
        let mut count = 0;
        let mut error = None;
        for (index, event) in events.iter().enumerate() {
            let attempt = if index == 0 { attempt } else { 1 };
            let context = ProjectionContext::new(Arc::clone(&self.name), event.position, attempt);
            let mut batch = ReadModelBatch {
                trees: &self.trees,
                batch: &staged,
                event: vec![BTreeMap::new(); self.trees.len()],
            };
            let projection = &mut self.projection;
            let result = catch_unwind(AssertUnwindSafe(|| {
                projection.handle(event, &mut batch, &context)
            }));
            match result {
                Ok(Ok(())) => {
                    let writes = std::mem::take(&mut batch.event);
                    for (into, from) in staged.iter_mut().zip(writes) {
                        into.extend(from);
                    }
                    count += 1;
                }
                Ok(Err(failure)) => {
                    error = Some(failure);
                    break;
                }
                Err(panic) => {
                    error = Some(ProjectionError::Panicked(panic_message(&*panic)));
                    break;
                }
            }
        }
        if count > 0 {
            if let Err(failure) = self.commit(&staged, events[count - 1].position) {
                return Applied {
                    count: 0,
                    error: Some(failure.into()),
                    store_failed: true,
                };
            }
        }
        Applied {
            count,
            error,
            store_failed: false,
        }
    }

    fn start_checkpoint(&mut self, position: Position) -> Result<SaveCheckpoint, StoreError> {
        if position != self.stored {
            // Only progress through events that changed nothing: one key,
            // atomic on its own.
            self.store
                .tree(CHECKPOINTS)?
                .insert(self.name.as_bytes(), &position.0.to_be_bytes())
                .map_err(sled_error)?;
            self.stored = position;
        }
        let store = Arc::clone(&self.store);
        Ok(Box::pin(async move { store.sync().await }))
    }

    async fn reset(&mut self) -> (bool, Result<(), ProjectionControlError>) {
        // The hook first: if it fails, nothing was erased yet.
        match catch_unwind(AssertUnwindSafe(|| self.projection.reset())) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return (false, Err(error.into())),
            Err(panic) => {
                return (
                    false,
                    Err(ProjectionError::Panicked(panic_message(&*panic)).into()),
                )
            }
        }
        // One transaction erases the read model and moves the checkpoint to
        // the start, so a crash leaves either the old pair or the new one.
        let mut staged: Staged = Vec::with_capacity(self.trees.len());
        for (_, tree) in &self.trees {
            let mut removals = BTreeMap::new();
            for key in tree.iter().keys() {
                match key {
                    Ok(key) => removals.insert(key.to_vec(), None),
                    Err(error) => return (false, Err(sled_error(error).into())),
                };
            }
            staged.push(removals);
        }
        if let Err(error) = self.commit(&staged, Position::START) {
            return (false, Err(error.into()));
        }
        (true, self.store.sync().await.map_err(Into::into))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ExpectedVersion, NewEvent, StreamId};
    use crate::store::EventStore;

    /// Adds 1 to a counter per event; fails (after staging a write) on
    /// events of type `Bad`.
    struct Adder;

    impl SledProjection for Adder {
        fn trees(&self) -> Vec<String> {
            vec!["unit-sum".into()]
        }

        fn handle(
            &mut self,
            event: &RecordedEvent,
            batch: &mut ReadModelBatch<'_>,
            _: &ProjectionContext,
        ) -> Result<(), ProjectionError> {
            let sum = batch.get("unit-sum", "sum")?.map_or(0, |v| v[0]);
            batch.insert("unit-sum", "sum", vec![sum + 1])?;
            if event.event_type == "Bad" {
                return Err(ProjectionError::handler("bad"));
            }
            assert!(matches!(
                batch.insert("elsewhere", "k", vec![]),
                Err(ProjectionError::UnknownTree(_))
            ));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_batch_commits_the_events_before_a_failure_and_discards_the_failed_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let stream = StreamId::new("unit-1").unwrap();
        let events = ["Good", "Good", "Bad", "Good"]
            .into_iter()
            .map(|t| NewEvent::new(t, Vec::new()))
            .collect();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
        let events = store
            .read_stream(
                &stream,
                crate::Version::FIRST,
                crate::ReadDirection::Forward,
                10,
            )
            .await
            .unwrap();
        let (mut runner, checkpoint) =
            SledRunner::open(Arc::clone(&store), "unit".into(), Adder).unwrap();
        assert_eq!(checkpoint, Position::START);

        let applied = runner.apply(&events, 1).await;
        assert_eq!(applied.count, 2);
        assert!(!applied.store_failed);
        assert!(matches!(applied.error, Some(ProjectionError::Handler(_))));
        let tree = store.database().open_tree("unit-sum").unwrap();
        // Two events staged on top of each other's writes; the failed one's
        // write is gone; the checkpoint moved with the writes.
        assert_eq!(tree.get("sum").unwrap().unwrap().as_ref(), &[2]);
        assert_eq!(
            store.load_checkpoint("unit").await.unwrap(),
            Some(Position(2))
        );

        let (at_start, result) = runner.reset().await;
        assert!(at_start && result.is_ok());
        assert!(tree.is_empty());
        assert_eq!(
            store.load_checkpoint("unit").await.unwrap(),
            Some(Position::START)
        );
    }

    #[tokio::test]
    async fn store_trees_are_refused() {
        struct Sneaky;
        impl SledProjection for Sneaky {
            fn trees(&self) -> Vec<String> {
                vec!["log-copy".into()]
            }
            fn handle(
                &mut self,
                _: &RecordedEvent,
                _: &mut ReadModelBatch<'_>,
                _: &ProjectionContext,
            ) -> Result<(), ProjectionError> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        assert!(matches!(
            SledRunner::open(store, "sneaky".into(), Sneaky),
            Err(ProjectionControlError::InvalidInput(
                InvalidInput::ReservedName { .. }
            ))
        ));
    }
}
