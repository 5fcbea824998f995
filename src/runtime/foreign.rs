//! Foreign writes: when several processes share the store, another process
//! may append to a stream whose actor lives here, and that actor's state is
//! then behind. A watcher task follows the store's live feed (which carries
//! every process's commits) and passivates such an actor if it is idle, so
//! that the next command recovers the current state instead of deciding on
//! a stale one and paying a conflict round trip. A busy actor is left
//! alone: its own write is on the way, or it meets the conflict and catches
//! up. Missing a foreign write (the feed lagged) costs only that conflict.

use std::any::TypeId;
use std::sync::{Arc, Weak};

use tracing::debug;

use crate::runtime::registry::SlotKey;
use crate::runtime::{lock, Core};
use crate::store::FeedError;

/// Starts the watcher on the current tokio runtime, if there is one. It
/// ends when the store's feed ends (shutdown) or the runtime is dropped.
pub(super) fn watch(core: &Arc<Core>) {
    if !core.store.shared_by_processes() {
        return;
    }
    let Ok(tokio) = tokio::runtime::Handle::try_current() else {
        debug!("no tokio runtime: actors are not refreshed on foreign writes");
        return;
    };
    let feed = core.store.subscribe_live();
    let core = Arc::downgrade(core);
    tokio.spawn(run(core, feed));
}

async fn run(core: Weak<Core>, mut feed: crate::store::LiveFeed) {
    loop {
        let commit = match feed.recv().await {
            Ok(commit) => commit,
            Err(FeedError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let Some(core) = core.upgrade() else {
            return;
        };
        let mut passivated = 0usize;
        for event in commit.iter() {
            let stream = event.stream_id.as_str();
            let Some((category, _)) = stream.split_once('-') else {
                continue;
            };
            let aggregate: Option<TypeId> = lock(&core.categories)
                .get(category)
                .map(|(aggregate, _)| *aggregate);
            let Some(aggregate) = aggregate else {
                continue;
            };
            let key = SlotKey {
                aggregate,
                stream: event.stream_id.clone(),
            };
            if core.registry.passivate_if_behind(&key, event.version.0) {
                passivated += 1;
            }
        }
        if passivated > 0 {
            debug!(
                passivated,
                "passivated actors behind another process's writes"
            );
        }
    }
}
