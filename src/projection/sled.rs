//! Read models kept in trees of the [`SledStore`]'s database, applied
//! exactly once: a [`SledProjection`] is a synchronous handler (sled needs no
//! await) that stages its writes in a [`ReadModelBatch`]; it runs as a
//! [`ReadModel`] of the sled store, through the store's read-model
//! capability like any other.

use crate::codec::{decode_event, DomainEvent};
use crate::error::ProjectionError;
use crate::event::RecordedEvent;
use crate::projection::{ProjectionContext, ReadModel, Typed};
use crate::store::sled::SledStore;
use crate::store::ReadModelBatch;

/// A projection whose read model lives in trees of the
/// [`SledStore`](crate::SledStore)'s database, applied exactly once.
///
/// Run it with [`ProjectionHandle::spawn_sled`](crate::ProjectionHandle::spawn_sled).
/// Keep all of the read model's state in its trees: staged writes of a
/// failed or crashed batch are thrown away, fields of `self` are not rolled
/// back. Nothing else may write to these trees while the projection runs.
/// Readers query them with
/// [`SledStore::read_model`](crate::SledStore::read_model) and see every
/// batch once it is committed (after
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
        batch: &mut ReadModelBatch,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError>;

    /// Stages the writes for several events, in order; `context` is the
    /// last event's. Override it where one call for many events saves work.
    /// Default: [`SledProjection::handle`] per event.
    ///
    /// # Errors
    /// An error (or a panic) discards the writes of the whole call; the
    /// events are then handled again one at a time with
    /// [`SledProjection::handle`] (see [`ReadModel::handle_batch`]).
    fn handle_batch(
        &mut self,
        events: &[RecordedEvent],
        batch: &mut ReadModelBatch,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        for (index, event) in events.iter().enumerate() {
            self.handle(event, batch, &context.for_event(index, event))?;
        }
        Ok(())
    }

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

/// A [`SledProjection`] of the typed events of one aggregate type, decoded
/// with [`decode_event`]. Run it as `Typed(projection)`; give the projection
/// a filter for the aggregate's category so that it sees only its own
/// events. An event that does not decode is a failure
/// ([`ProjectionError::Codec`]) under the failure policy.
pub trait TypedSledProjection: Send + 'static {
    /// The aggregate's event enum.
    type Event: DomainEvent;

    /// As [`SledProjection::trees`].
    fn trees(&self) -> Vec<String>;

    /// Stages the writes for one decoded event; `recorded` is the raw event
    /// (stream, version, position, metadata).
    ///
    /// # Errors
    /// As [`SledProjection::handle`].
    fn handle(
        &mut self,
        event: Self::Event,
        recorded: &RecordedEvent,
        batch: &mut ReadModelBatch,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError>;

    /// As [`SledProjection::reset`].
    ///
    /// # Errors
    /// As [`SledProjection::reset`].
    fn reset(&mut self) -> Result<(), ProjectionError> {
        Ok(())
    }
}

impl<P: TypedSledProjection> SledProjection for Typed<P> {
    fn trees(&self) -> Vec<String> {
        self.0.trees()
    }

    fn handle(
        &mut self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let decoded = decode_event::<P::Event>(event)?;
        self.0.handle(decoded, event, batch, context)
    }

    fn reset(&mut self) -> Result<(), ProjectionError> {
        self.0.reset()
    }
}

/// Runs a [`SledProjection`] as a [`ReadModel`] of the sled store.
#[derive(Debug)]
pub(crate) struct SledReadModel<P>(pub(crate) P);

impl<P: SledProjection> ReadModel<SledStore> for SledReadModel<P> {
    fn tables(&self) -> Vec<String> {
        self.0.trees()
    }

    async fn handle(
        &mut self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        self.0.handle(event, batch, context)
    }

    async fn handle_batch(
        &mut self,
        events: &[RecordedEvent],
        batch: &mut ReadModelBatch,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        self.0.handle_batch(events, batch, context)
    }

    async fn reset(&mut self, batch: &mut ReadModelBatch) -> Result<(), ProjectionError> {
        // The hook first: if it fails, nothing is erased.
        self.0.reset()?;
        for tree in self.0.trees() {
            batch.clear(&tree)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::error::InvalidInput;
    use crate::event::{ExpectedVersion, NewEvent, Position, StreamId};
    use crate::projection::read_model::ReadModelRunner;
    use crate::projection::runner::Runner;
    use crate::projection::ProjectionControlError;
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
            batch: &mut ReadModelBatch,
            _: &ProjectionContext,
        ) -> Result<(), ProjectionError> {
            batch.update::<u64>("unit-sum", "sum", |sum| sum + 1)?;
            if event.event_type == "Bad" {
                return Err(ProjectionError::handler("bad"));
            }
            assert!(matches!(
                batch.put_raw("elsewhere", b"k", vec![]),
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
                crate::store::ReadDirection::Forward,
                10,
            )
            .await
            .unwrap();
        let (mut runner, checkpoint) =
            ReadModelRunner::open(Arc::clone(&store), "unit".into(), SledReadModel(Adder))
                .await
                .unwrap();
        assert_eq!(checkpoint, Position::START);

        let applied = runner.apply(&events, 1).await;
        assert_eq!(applied.count, 2);
        assert!(!applied.store_failed);
        assert!(matches!(applied.error, Some(ProjectionError::Handler(_))));
        let view = store.read_model::<str, u64>("unit-sum").unwrap();
        // Two events staged on top of each other's writes; the failed one's
        // write is gone; the checkpoint moved with the writes.
        assert_eq!(view.get("sum").unwrap(), Some(2));
        assert_eq!(
            store.load_checkpoint("unit").await.unwrap(),
            Some(Position(2))
        );

        let (at_start, result) = runner.reset().await;
        assert!(at_start && result.is_ok());
        assert!(view.is_empty().unwrap());
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
                _: &mut ReadModelBatch,
                _: &ProjectionContext,
            ) -> Result<(), ProjectionError> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        assert!(matches!(
            ReadModelRunner::open(store, "sneaky".into(), SledReadModel(Sneaky)).await,
            Err(ProjectionControlError::InvalidInput(
                InvalidInput::ReservedName { .. }
            ))
        ));
    }
}
