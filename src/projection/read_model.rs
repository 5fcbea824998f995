//! The runner of a [`ReadModel`]: it talks to the store through the
//! [`ReadModelStore`] capability only. Per batch of events, one transaction:
//! the handler's writes and the checkpoint are committed together, fenced on
//! the checkpoint the runner last committed.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::StoreError;
use crate::event::{Position, RecordedEvent};
use crate::projection::runner::{caught, Applied, Runner, SaveCheckpoint};
use crate::projection::ProjectionControlError;
use crate::projection::{ProjectionContext, ReadModel};
use crate::store::ReadModelStore;

/// Runs a [`ReadModel`] on a store with the read-model capability.
pub(crate) struct ReadModelRunner<S, P> {
    store: Arc<S>,
    name: Arc<str>,
    tables: Vec<String>,
    projection: P,
    /// The checkpoint as this runner last committed it (maybe not yet
    /// durable): the `from` of its next commit.
    stored: Option<Position>,
}

/// A failure of the store, not of the handler: the projection stops rather
/// than skip an event it never applied.
fn store_failed(error: StoreError) -> Applied {
    Applied {
        count: 0,
        error: Some(error.into()),
        store_failed: true,
    }
}

impl<S: ReadModelStore, P: ReadModel<S>> ReadModelRunner<S, P> {
    /// Checks the read model's tables with the store and reads its
    /// checkpoint.
    pub(crate) async fn open(
        store: Arc<S>,
        name: Arc<str>,
        projection: P,
    ) -> Result<(Self, Position), ProjectionControlError> {
        let tables = projection.tables();
        // A transaction dropped unused writes nothing; opening one checks
        // the names before the actor starts.
        store
            .begin(&name, &tables)
            .await
            .map_err(|error| match error {
                StoreError::InvalidInput(invalid) => ProjectionControlError::InvalidInput(invalid),
                other => ProjectionControlError::Store(other),
            })?;
        let stored = store.load_checkpoint(&name).await?;
        let runner = Self {
            store,
            name,
            tables,
            projection,
            stored,
        };
        Ok((runner, stored.unwrap_or(Position::START)))
    }

    async fn commit(
        &mut self,
        transaction: S::Transaction,
        position: Position,
    ) -> Result<(), StoreError> {
        self.store
            .commit(transaction, &self.name, self.stored, position)
            .await?;
        self.stored = Some(position);
        Ok(())
    }

    /// Handles `events` one at a time, each after a savepoint, so that a
    /// failure drops the failing event's writes alone; commits the events
    /// before it.
    async fn apply_one_by_one(&mut self, events: &[RecordedEvent], attempt: u32) -> Applied {
        let mut transaction = match self.store.begin(&self.name, &self.tables).await {
            Ok(transaction) => transaction,
            Err(error) => return store_failed(error),
        };
        let mut count = 0;
        let mut error = None;
        for (index, event) in events.iter().enumerate() {
            let attempt = if index == 0 { attempt } else { 1 };
            let context = ProjectionContext::new(Arc::clone(&self.name), event.position, attempt);
            if index > 0 {
                if let Err(error) = self.store.savepoint(&mut transaction).await {
                    return store_failed(error);
                }
            }
            let handled = caught(self.projection.handle(event, &mut transaction, &context)).await;
            if let Err(failure) = handled {
                if let Err(error) = self.store.rollback_to_savepoint(&mut transaction).await {
                    return store_failed(error);
                }
                error = Some(failure);
                break;
            }
            count += 1;
        }
        if count > 0 {
            if let Err(error) = self.commit(transaction, events[count - 1].position).await {
                return store_failed(error);
            }
        }
        Applied::handled(count, error)
    }
}

#[async_trait]
impl<S: ReadModelStore, P: ReadModel<S>> Runner for ReadModelRunner<S, P> {
    async fn apply(&mut self, events: &[RecordedEvent], attempt: u32) -> Applied {
        let Some(last) = events.last() else {
            return Applied::handled(0, None);
        };
        let mut transaction = match self.store.begin(&self.name, &self.tables).await {
            Ok(transaction) => transaction,
            Err(error) => return store_failed(error),
        };
        let context = ProjectionContext::new(Arc::clone(&self.name), last.position, attempt);
        let handled = caught(
            self.projection
                .handle_batch(events, &mut transaction, &context),
        )
        .await;
        match handled {
            Ok(()) => match self.commit(transaction, last.position).await {
                Ok(()) => Applied::handled(events.len(), None),
                Err(error) => store_failed(error),
            },
            Err(error) if events.len() == 1 => Applied::handled(0, Some(error)),
            // Which event failed, and what the ones before it write, takes
            // one event at a time.
            Err(_) => {
                drop(transaction);
                self.apply_one_by_one(events, attempt).await
            }
        }
    }

    async fn start_checkpoint(&mut self, position: Position) -> Result<SaveCheckpoint, StoreError> {
        if Some(position) != self.stored {
            // Progress through events that wrote nothing: a commit of the
            // checkpoint alone, fenced like any other.
            let transaction = self.store.begin(&self.name, &[]).await?;
            self.commit(transaction, position).await?;
        }
        let store = Arc::clone(&self.store);
        Ok(Box::pin(async move { store.flush_read_models().await }))
    }

    async fn reset(&mut self) -> (bool, Result<(), ProjectionControlError>) {
        let mut transaction = match self.store.begin(&self.name, &self.tables).await {
            Ok(transaction) => transaction,
            Err(error) => return (false, Err(error.into())),
        };
        // The hook writes the erasure into the transaction: if it fails,
        // nothing was erased.
        let erased = caught(self.projection.reset(&mut transaction)).await;
        if let Err(error) = erased {
            return (false, Err(error.into()));
        }
        // One commit erases the read model and moves the checkpoint to the
        // start, so a crash leaves either the old pair or the new one.
        if let Err(error) = self.commit(transaction, Position::START).await {
            return (false, Err(error.into()));
        }
        (
            true,
            self.store.flush_read_models().await.map_err(Into::into),
        )
    }
}
