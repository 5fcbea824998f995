//! The sled store's read-model capability: a [`ReadModelBatch`] stages a
//! batch's writes in memory (reads see them), and the commit copies them into
//! the read model's trees and moves the checkpoint in one multi-tree sled
//! transaction, after checking that the checkpoint is still where the runner
//! left it. Handlers run outside any sled lock, so a slow handler never holds
//! up the store's writer. Readers get a [`ReadModelView`], which cannot open
//! the store's own trees.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::IVec;

use crate::codec::{decode_value, encode_value};
use crate::error::{InvalidInput, ProjectionError, ReadModelError, StoreError};
use crate::event::Position;
use crate::store::read_model::{FromKey, Key, ReadModelStore};
use crate::store::sled::{sled_error, SledStore};
use crate::store::validate_checkpoint_name;

/// Names the store keeps for its own trees (and sled for its own); no
/// read-model tree may start with one of them.
const RESERVED_TREE_PREFIXES: [&str; 4] = ["log", "snapshots", "checkpoints", "__sled"];
/// The store's tree of checkpoints: name -> big-endian u64 position.
const CHECKPOINTS: &str = "checkpoints";

/// Refuses a tree name that is empty or belongs to the store.
fn validate_tree_name(name: &str) -> Result<(), InvalidInput> {
    if name.is_empty() {
        return Err(InvalidInput::EmptyName {
            what: "read-model tree name",
        });
    }
    if RESERVED_TREE_PREFIXES
        .iter()
        .any(|reserved| name.starts_with(reserved))
    {
        return Err(InvalidInput::ReservedName {
            what: "read-model tree name",
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn decode_checkpoint(name: &str, bytes: &[u8]) -> Result<Position, StoreError> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("checkpoint {name:?} is not 8 bytes")))?;
    Ok(Position(u64::from_be_bytes(bytes)))
}

/// Writes staged for one tree: `Some(value)` to insert, `None` to remove.
type Writes = BTreeMap<Vec<u8>, Option<IVec>>;

struct StagedTree {
    name: String,
    tree: sled::Tree,
    /// Writes kept by the last savepoint.
    kept: Writes,
    /// Writes since the last savepoint.
    recent: Writes,
}

/// The read model as a sled read-model handler sees it: its trees as
/// committed, plus the writes staged earlier in the batch. Writes are staged
/// in memory and committed with the checkpoint when the batch ends, all or
/// nothing. Values go through serde (postcard), keys through [`Key`] (order
/// preserving); the `_raw` methods take bytes as they are.
///
/// This is the sled store's [`ReadModelStore::Transaction`].
pub struct ReadModelBatch {
    trees: Vec<StagedTree>,
}

impl fmt::Debug for ReadModelBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadModelBatch")
            .field(
                "trees",
                &self.trees.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .field(
                "staged_writes",
                &self
                    .trees
                    .iter()
                    .map(|t| t.kept.len() + t.recent.len())
                    .sum::<usize>(),
            )
            .finish()
    }
}

impl ReadModelBatch {
    fn staged(&self, tree: &str) -> Result<&StagedTree, ProjectionError> {
        self.trees
            .iter()
            .find(|staged| staged.name == tree)
            .ok_or_else(|| ProjectionError::UnknownTree(tree.to_owned()))
    }

    fn staged_mut(&mut self, tree: &str) -> Result<&mut StagedTree, ProjectionError> {
        self.trees
            .iter_mut()
            .find(|staged| staged.name == tree)
            .ok_or_else(|| ProjectionError::UnknownTree(tree.to_owned()))
    }

    /// The bytes stored under the raw `key` in `tree`, staged writes
    /// included.
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`] for a tree the read model did not
    /// declare, [`ProjectionError::Store`] when sled fails.
    pub fn get_raw(&self, tree: &str, key: &[u8]) -> Result<Option<IVec>, ProjectionError> {
        let staged = self.staged(tree)?;
        if let Some(value) = staged.recent.get(key).or_else(|| staged.kept.get(key)) {
            return Ok(value.clone());
        }
        Ok(staged.tree.get(key).map_err(sled_error)?)
    }

    /// Stages `key = value` in `tree`, bytes as they are.
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`].
    pub fn put_raw(
        &mut self,
        tree: &str,
        key: &[u8],
        value: impl Into<IVec>,
    ) -> Result<(), ProjectionError> {
        self.staged_mut(tree)?
            .recent
            .insert(key.to_vec(), Some(value.into()));
        Ok(())
    }

    /// Stages the removal of the raw `key` from `tree`.
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`].
    pub fn remove_raw(&mut self, tree: &str, key: &[u8]) -> Result<(), ProjectionError> {
        self.staged_mut(tree)?.recent.insert(key.to_vec(), None);
        Ok(())
    }

    /// The value of `key` in `tree`, staged writes included, decoded as `V`.
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`], [`ProjectionError::Codec`] when the
    /// stored bytes are not a `V`, [`ProjectionError::Store`].
    pub fn get<V: DeserializeOwned>(
        &self,
        tree: &str,
        key: &(impl Key + ?Sized),
    ) -> Result<Option<V>, ProjectionError> {
        match self.get_raw(tree, &key.to_key_bytes())? {
            Some(bytes) => Ok(Some(decode_value(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Whether `key` is in `tree`, staged writes included.
    ///
    /// # Errors
    /// As [`ReadModelBatch::get_raw`].
    pub fn contains_key(
        &self,
        tree: &str,
        key: &(impl Key + ?Sized),
    ) -> Result<bool, ProjectionError> {
        Ok(self.get_raw(tree, &key.to_key_bytes())?.is_some())
    }

    /// Stages `key = value` in `tree`, the value encoded with postcard.
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`], [`ProjectionError::Codec`] when
    /// the value does not encode.
    pub fn put<V: Serialize + ?Sized>(
        &mut self,
        tree: &str,
        key: &(impl Key + ?Sized),
        value: &V,
    ) -> Result<(), ProjectionError> {
        let value = encode_value(value)?;
        self.put_raw(tree, &key.to_key_bytes(), value)
    }

    /// Stages the removal of `key` from `tree`.
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`].
    pub fn remove(&mut self, tree: &str, key: &(impl Key + ?Sized)) -> Result<(), ProjectionError> {
        self.remove_raw(tree, &key.to_key_bytes())
    }

    /// Replaces the value of `key` with `change(old)`, where `old` is the
    /// current value or `V::default()` when there is none (a counter:
    /// `batch.update::<u64>(tree, &key, |n| n + 1)`). Returns the new value.
    ///
    /// # Errors
    /// As [`ReadModelBatch::get`] and [`ReadModelBatch::put`].
    pub fn update<V: Serialize + DeserializeOwned + Default>(
        &mut self,
        tree: &str,
        key: &(impl Key + ?Sized),
        change: impl FnOnce(V) -> V,
    ) -> Result<V, ProjectionError> {
        let key = key.to_key_bytes();
        let old = match self.get_raw(tree, &key)? {
            Some(bytes) => decode_value(&bytes)?,
            None => V::default(),
        };
        let new = change(old);
        self.put_raw(tree, &key, encode_value(&new)?)?;
        Ok(new)
    }

    /// Stages the removal of every key of `tree` (committed and staged).
    ///
    /// # Errors
    /// [`ProjectionError::UnknownTree`], [`ProjectionError::Store`].
    pub fn clear(&mut self, tree: &str) -> Result<(), ProjectionError> {
        let staged = self.staged_mut(tree)?;
        let mut removals: Writes = staged.kept.keys().map(|key| (key.clone(), None)).collect();
        for key in staged.tree.iter().keys() {
            removals.insert(key.map_err(sled_error)?.to_vec(), None);
        }
        staged.recent = removals;
        Ok(())
    }

    /// The names of the trees this batch writes.
    pub fn trees(&self) -> impl Iterator<Item = &str> {
        self.trees.iter().map(|staged| staged.name.as_str())
    }
}

impl ReadModelStore for SledStore {
    type Transaction = ReadModelBatch;

    async fn begin(&self, _name: &str, tables: &[String]) -> Result<ReadModelBatch, StoreError> {
        let mut trees = Vec::with_capacity(tables.len());
        for name in tables {
            validate_tree_name(name)?;
            trees.push(StagedTree {
                name: name.clone(),
                tree: self.tree(name)?,
                kept: Writes::new(),
                recent: Writes::new(),
            });
        }
        Ok(ReadModelBatch { trees })
    }

    async fn savepoint(&self, batch: &mut ReadModelBatch) -> Result<(), StoreError> {
        for staged in &mut batch.trees {
            let recent = std::mem::take(&mut staged.recent);
            staged.kept.extend(recent);
        }
        Ok(())
    }

    async fn rollback_to_savepoint(&self, batch: &mut ReadModelBatch) -> Result<(), StoreError> {
        for staged in &mut batch.trees {
            staged.recent.clear();
        }
        Ok(())
    }

    async fn commit(
        &self,
        mut batch: ReadModelBatch,
        name: &str,
        from: Option<Position>,
        to: Position,
    ) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        self.savepoint(&mut batch).await?;
        let checkpoints = self.tree(CHECKPOINTS)?;
        let mut trees: Vec<&sled::Tree> = batch.trees.iter().map(|staged| &staged.tree).collect();
        trees.push(&checkpoints);
        let checkpoint = to.0.to_be_bytes();
        // The closure may run again on a conflict, so it only reads and copies.
        let result: Result<(), TransactionError<StoreError>> =
            trees.as_slice().transaction(|views| {
                let (checkpoint_view, tree_views) = views.split_last().expect("checkpoints");
                let found = checkpoint_view
                    .get(name)?
                    .map(|bytes| decode_checkpoint(name, &bytes))
                    .transpose()
                    .map_err(ConflictableTransactionError::Abort)?;
                if found != from {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::CheckpointMoved {
                            name: name.to_owned(),
                            expected: from,
                            found,
                        },
                    ));
                }
                for (view, staged) in tree_views.iter().zip(&batch.trees) {
                    for (key, value) in &staged.kept {
                        match value {
                            Some(value) => view.insert(key.as_slice(), value.clone())?,
                            None => view.remove(key.as_slice())?,
                        };
                    }
                }
                checkpoint_view.insert(name, &checkpoint[..])?;
                Ok(())
            });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(error)) => Err(sled_error(error)),
            Err(TransactionError::Abort(error)) => Err(error),
        }
    }

    async fn flush_read_models(&self) -> Result<(), StoreError> {
        self.sync().await
    }
}

/// A committed read model's tree, for readers: typed lookups and ranges,
/// keys through [`Key`], values through serde (postcard), as a
/// [`ReadModelBatch`] wrote them. Get one with [`SledStore::read_model`].
///
/// It holds no sled handle: each call opens the tree, reads, and lets go,
/// so that the store can release its directory at shutdown; after it, calls
/// fail with [`StoreError::Closed`]. Each call sees the commits made before
/// it (one whole batch or none); two calls may see different commits.
pub struct ReadModelView<'a, K: ?Sized, V> {
    store: &'a SledStore,
    tree: String,
    types: PhantomData<fn(&K) -> V>,
}

impl<K: ?Sized, V> fmt::Debug for ReadModelView<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadModelView")
            .field("tree", &self.tree)
            .finish_non_exhaustive()
    }
}

type Entries<K, V> = Result<Vec<(K, V)>, ReadModelError>;

impl<K: Key + ?Sized, V: DeserializeOwned> ReadModelView<'_, K, V> {
    fn open(&self) -> Result<sled::Tree, StoreError> {
        self.store.tree(&self.tree)
    }

    /// The tree's name.
    pub fn name(&self) -> &str {
        &self.tree
    }

    /// The value of `key`, if any.
    ///
    /// # Errors
    /// [`ReadModelError::Codec`] when the stored bytes are not a `V`;
    /// [`ReadModelError::Store`].
    pub fn get(&self, key: &K) -> Result<Option<V>, ReadModelError> {
        match self.get_raw(&key.to_key_bytes())? {
            Some(bytes) => Ok(Some(decode_value(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The bytes stored under the raw `key`.
    ///
    /// # Errors
    /// [`ReadModelError::Store`].
    pub fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ReadModelError> {
        Ok(self
            .open()?
            .get(key)
            .map_err(sled_error)?
            .map(|v| v.to_vec()))
    }

    /// How many keys the tree holds (a scan: it costs what the tree's size
    /// does).
    ///
    /// # Errors
    /// [`ReadModelError::Store`].
    pub fn len(&self) -> Result<usize, ReadModelError> {
        Ok(self.open()?.len())
    }

    /// Whether the tree holds no key.
    ///
    /// # Errors
    /// [`ReadModelError::Store`].
    pub fn is_empty(&self) -> Result<bool, ReadModelError> {
        Ok(self.open()?.is_empty())
    }

    /// Every entry, raw, in key order.
    ///
    /// # Errors
    /// [`ReadModelError::Store`].
    pub fn iter_raw(&self) -> Entries<Vec<u8>, Vec<u8>> {
        self.open()?
            .iter()
            .map(|entry| {
                let (key, value) = entry.map_err(sled_error)?;
                Ok((key.to_vec(), value.to_vec()))
            })
            .collect()
    }
}

impl<K: FromKey, V: DeserializeOwned> ReadModelView<'_, K, V> {
    fn decode(entries: impl Iterator<Item = sled::Result<(IVec, IVec)>>) -> Entries<K, V> {
        entries
            .map(|entry| {
                let (key, value) = entry.map_err(sled_error)?;
                Ok((K::from_key_bytes(&key)?, decode_value(&value)?))
            })
            .collect()
    }

    /// Every entry, in key order.
    ///
    /// # Errors
    /// [`ReadModelError::Codec`] when a key or value does not decode;
    /// [`ReadModelError::Store`].
    pub fn iter(&self) -> Entries<K, V> {
        Self::decode(self.open()?.iter())
    }

    /// The entries whose keys are in `range`, in key order (the encoding
    /// keeps the order of the keys; see [`Key`]).
    ///
    /// # Errors
    /// As [`ReadModelView::iter`].
    pub fn range(&self, range: impl RangeBounds<K>) -> Entries<K, V> {
        let bound = |bound: Bound<&K>| match bound {
            Bound::Included(key) => Bound::Included(key.to_key_bytes()),
            Bound::Excluded(key) => Bound::Excluded(key.to_key_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let bounds = (bound(range.start_bound()), bound(range.end_bound()));
        Self::decode(self.open()?.range::<Vec<u8>, _>(bounds))
    }
}

impl SledStore {
    /// A read-only view of the read-model tree `tree` (written by a
    /// [`SledProjection`](crate::projection::SledProjection)), with keys of type `K`
    /// and values of type `V`. Readers see every batch once it is committed
    /// (after [`ProjectionHandle::wait_for`](crate::ProjectionHandle::wait_for)).
    ///
    /// # Errors
    /// [`ReadModelError::InvalidInput`] for an empty name or one of the
    /// store's own trees (`log`, `snapshots`, `checkpoints`, ...).
    pub fn read_model<K: Key + ?Sized, V: DeserializeOwned>(
        &self,
        tree: &str,
    ) -> Result<ReadModelView<'_, K, V>, ReadModelError> {
        validate_tree_name(tree)?;
        Ok(ReadModelView {
            store: self,
            tree: tree.to_owned(),
            types: PhantomData,
        })
    }
}
