//! The projection actor: one ractor actor per running projection. It pulls
//! events from its subscription in batches, hands them to a runner (a plain
//! [`Projection`](crate::Projection) or a read model), applies the failure
//! policy, saves the checkpoint, and publishes its status on a watch channel
//! so that status queries and `wait_for` never queue behind a slow handler.
//! The state it holds is in `state.rs`.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::error::StoreError;
use crate::event::Position;
use crate::projection::state::ActorState;
use crate::projection::ProjectionControlError;

/// The actor's messages. Private to the crate: users hold a
/// [`ProjectionHandle`](crate::ProjectionHandle).
#[derive(Debug)]
pub(crate) enum ProjectionMessage {
    /// Take and handle the next batch. Sent by the actor to itself, one at a
    /// time, so that control messages interleave with the work.
    Process,
    Pause(RpcReplyPort<()>),
    Resume(RpcReplyPort<()>),
    Reset(RpcReplyPort<Result<(), ProjectionControlError>>),
    /// Save the checkpoint and stop. No reply port when sent because the
    /// last handle was dropped.
    Shutdown(Option<RpcReplyPort<Result<Position, StoreError>>>),
}

/// The projection actor. Configuration lives in [`ActorState`], which
/// `pre_start` receives whole: everything that can fail with a typed error
/// (loading the checkpoint, opening trees) happens before the spawn.
#[derive(Debug)]
pub(crate) struct ProjectionActor;

impl Actor for ProjectionActor {
    type Msg = ProjectionMessage;
    type State = ActorState;
    type Arguments = ActorState;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: ActorState,
    ) -> Result<ActorState, ActorProcessingErr> {
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ActorState,
    ) -> Result<(), ActorProcessingErr> {
        state.started(&myself);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut ActorState,
    ) -> Result<(), ActorProcessingErr> {
        // Each control message publishes the status before it replies, so
        // that the caller's next status or wait_for already sees the change.
        match message {
            ProjectionMessage::Process => state.on_process().await,
            ProjectionMessage::Pause(reply) => {
                state.pause().await;
                state.publish();
                let _ = reply.send(());
            }
            ProjectionMessage::Resume(reply) => {
                state.resume();
                state.publish();
                let _ = reply.send(());
            }
            ProjectionMessage::Reset(reply) => {
                let result = state.control_reset().await;
                state.publish();
                let _ = reply.send(result);
            }
            ProjectionMessage::Shutdown(reply) => {
                let result = state.stop().await;
                state.publish();
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
                myself.stop(None);
                return Ok(());
            }
        }
        state.publish();
        state.schedule(&myself);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use tokio::sync::Semaphore;

    use crate::error::{ProjectionError, StoreError};
    use crate::event::{ExpectedVersion, NewEvent, Position, RecordedEvent, StreamId};
    use crate::projection::runner::{Applied, Runner, SaveCheckpoint};
    use crate::projection::ProjectionControlError;
    use crate::projection::{ProjectionConfig, ProjectionState};
    use crate::store::memory::MemoryStore;
    use crate::store::EventStore;
    use crate::ProjectionHandle;

    /// Applies every event before `fail_from`; the commit of a batch that
    /// reaches it fails, as a sled commit can. Checkpoint saves wait at
    /// `gate`, which opens a moment after that failure: the save under way
    /// completes once the projection already stopped handling.
    struct FailingCommit {
        fail_from: Position,
        gate: Arc<Semaphore>,
    }

    #[async_trait]
    impl Runner for FailingCommit {
        async fn apply(&mut self, events: &[RecordedEvent], _attempt: u32) -> Applied {
            if events.iter().any(|event| event.position >= self.fail_from) {
                let gate = Arc::clone(&self.gate);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    gate.add_permits(100);
                });
                return Applied {
                    count: 0,
                    error: Some(ProjectionError::handler("the commit failed")),
                    store_failed: true,
                };
            }
            Applied {
                count: events.len(),
                error: None,
                store_failed: false,
            }
        }

        async fn start_checkpoint(
            &mut self,
            _position: Position,
        ) -> Result<SaveCheckpoint, StoreError> {
            let gate = Arc::clone(&self.gate);
            Ok(Box::pin(async move {
                gate.acquire()
                    .await
                    .map_err(|_| StoreError::Closed)?
                    .forget();
                Ok(())
            }))
        }

        async fn reset(&mut self) -> (bool, Result<(), ProjectionControlError>) {
            (false, Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failed_commit_waits_for_the_save_under_way() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        let stream = StreamId::new("order-1").unwrap();
        let events = (0..20)
            .map(|_| NewEvent::new("Happened", Vec::new()))
            .collect();
        let last = store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap()
            .last_position;
        let config = ProjectionConfig::builder("failing")
            .checkpoint_every(10, Duration::from_secs(3600))
            .batch_size(5);
        let gate = Arc::new(Semaphore::new(0));
        let runner = FailingCommit {
            fail_from: Position(16),
            gate: Arc::clone(&gate),
        };
        let handle = ProjectionHandle::start(
            store,
            config.build().unwrap(),
            Box::new(runner),
            Position::START,
        )
        .await
        .unwrap();
        // The save of position 10 is under way when the batch 16..=20 fails.
        assert!(matches!(
            handle.wait_for(last, Duration::from_secs(5)).await,
            Err(ProjectionControlError::NotRunning {
                state: ProjectionState::Failed,
                ..
            })
        ));
        let status = handle.status();
        assert_eq!(
            (status.position, status.checkpoint),
            (Position(15), Position(10))
        );
        assert_eq!(handle.shutdown().await.unwrap(), Position(15));
    }
}
