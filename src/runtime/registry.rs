//! The registry of live aggregate actors: one [`Slot`] per stream, found
//! through a dashmap, holding the actor (spawned once, however many callers
//! race), the count of pending commands that bounds its mailbox, and its
//! last use for least-recently-used passivation. A slot is removed as soon
//! as its actor stops taking commands, so memory follows the live actors,
//! not every aggregate ever touched.

use std::any::TypeId;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use ractor::{ActorCell, ActorId};
use tokio::sync::OnceCell;
use tracing::debug;

use crate::event::StreamId;
use crate::runtime::SpawnFailure;

/// Set in [`Slot::state`] once the slot takes no more commands.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Which actor a stream's commands go to: the aggregate type and the stream.
/// The type is part of the key so that two aggregate types that (wrongly)
/// share a category still never receive each other's messages; the store's
/// expected-version check keeps their stream consistent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SlotKey {
    pub(crate) aggregate: TypeId,
    pub(crate) stream: StreamId,
}

/// One stream's entry.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Pending commands (sent or about to be sent, not yet answered by the
    /// actor), plus the [`CLOSED`] bit. One atomic, so that "close only if
    /// nothing is pending" and "acquire only if not closed" cannot interleave:
    /// a command is never sent to an actor that has decided to stop.
    state: AtomicUsize,
    /// The registry clock at the last use, for least-recently-used eviction.
    last_used: AtomicU64,
    /// The stream version the actor's state is at, so that another
    /// process's write can be told from the actor's own (runtime/foreign.rs).
    pub(crate) version: AtomicU64,
    /// The actor, spawned by the first caller; the others wait for it.
    pub(crate) actor: OnceCell<ActorCell>,
    /// Why the actor's spawn (its recovery, mostly) failed, set before the
    /// slot closes: the callers that waited for that spawn all get its
    /// error, rather than each replaying the stream again in turn. Boxed:
    /// every live slot carries the field, and almost none fills it.
    pub(crate) failure: OnceLock<Box<SpawnFailure>>,
}

/// Why a slot refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The slot's actor is stopping; look the stream up again.
    Closed,
    /// The pending bound is reached.
    Overloaded,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
            version: AtomicU64::new(0),
            actor: OnceCell::new(),
            failure: OnceLock::new(),
        }
    }

    /// Counts one more pending command, unless the slot is closed or already
    /// has `max_pending`.
    pub(crate) fn try_acquire(self: &Arc<Self>, max_pending: usize) -> Result<Permit, Refused> {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                if state & CLOSED != 0 || state >= max_pending {
                    None
                } else {
                    Some(state + 1)
                }
            })
            .map(|_| Permit {
                slot: Some(Arc::clone(self)),
            })
            .map_err(|state| {
                if state & CLOSED != 0 {
                    Refused::Closed
                } else {
                    Refused::Overloaded
                }
            })
    }

    /// The actor answered one pending command.
    pub(crate) fn release(&self) {
        self.state.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes no more commands; those already acquired still arrive.
    pub(crate) fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
    }

    /// Closes the slot only if no command is pending: then no command can
    /// reach the actor any more, and it can stop without losing one.
    pub(crate) fn close_if_idle(&self) -> bool {
        self.state
            .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    pub(crate) fn pending(&self) -> usize {
        self.state.load(Ordering::Acquire) & !CLOSED
    }

    /// Stops the slot's actor if the slot is closed and nothing is pending:
    /// no command can reach it any more. Called by whoever may have made
    /// that true from outside the actor: a permit given back unsent (its
    /// caller was cancelled between taking the place and sending), a
    /// closer that is not the actor (shutdown), and the spawner publishing
    /// the actor. Each side changes its own part and then reads the other's
    /// behind a `SeqCst` fence, so at least one of them sees both and stops
    /// the actor; stopping twice is harmless. Returns whether it asked the
    /// actor to stop.
    pub(crate) fn stop_if_drained(&self) -> bool {
        fence(Ordering::SeqCst);
        if self.is_closed() && self.pending() == 0 {
            if let Some(cell) = self.actor.get() {
                cell.stop(Some("closed and drained".to_owned()));
                return true;
            }
        }
        false
    }

    fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

/// One acquired pending command. Dropped before [`Permit::hand_over`] (the
/// send failed, or the caller gave up), it gives the place back; handed
/// over, the actor gives it back once it has answered.
#[derive(Debug)]
pub(crate) struct Permit {
    slot: Option<Arc<Slot>>,
}

impl Permit {
    pub(crate) fn hand_over(mut self) {
        self.slot = None;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.release();
            // Without this, a closed slot's actor whose last place was given
            // back unsent would wait for its idle check (and `shutdown` for
            // it), since only answered commands make it check.
            slot.stop_if_drained();
        }
    }
}

/// Every live slot and actor of one runtime.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    slots: DashMap<SlotKey, Arc<Slot>>,
    /// Running actors by id, so that the supervisor, which learns of a
    /// stopped or failed actor by its id only, can clean up its slot.
    actors: DashMap<ActorId, (SlotKey, Arc<Slot>)>,
    /// A logical clock for least-recently-used order: cheaper than reading
    /// the time on every command, and never equal for two uses.
    clock: AtomicU64,
    evicting: AtomicBool,
    shut_down: AtomicBool,
}

impl Registry {
    /// The open slot of `key`, created if missing or closed, and marked as
    /// just used. `None` once the runtime is shut down.
    pub(crate) fn slot(&self, key: &SlotKey) -> Option<Arc<Slot>> {
        let slot = match self.slots.entry(key.clone()) {
            Entry::Occupied(mut entry) => {
                if entry.get().is_closed() {
                    entry.insert(Arc::new(Slot::new()));
                }
                Arc::clone(entry.get())
            }
            Entry::Vacant(entry) => Arc::clone(&entry.insert(Arc::new(Slot::new()))),
        };
        // Checked after the insert: either `shutdown` sees this slot when it
        // closes them all, or this sees the flag.
        if self.shut_down.load(Ordering::SeqCst) {
            // The slot may be a live one that shutdown's pass, not there
            // yet, will no longer find once removed: stop its actor here.
            slot.close();
            self.remove(key, &slot);
            slot.stop_if_drained();
            return None;
        }
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        slot.last_used.store(now, Ordering::Relaxed);
        Some(slot)
    }

    /// The open slot of `key` if there is one, without creating it.
    pub(crate) fn get_open(&self, key: &SlotKey) -> Option<Arc<Slot>> {
        self.slots
            .get(key)
            .map(|slot| Arc::clone(&slot))
            .filter(|slot| !slot.is_closed())
    }

    /// Removes `slot` from the map if it is still the one for `key`.
    pub(crate) fn remove(&self, key: &SlotKey, slot: &Arc<Slot>) {
        self.slots
            .remove_if(key, |_, current| Arc::ptr_eq(current, slot));
    }

    /// An actor started for `slot` (called from its `pre_start`).
    pub(crate) fn actor_started(&self, id: ActorId, key: SlotKey, slot: Arc<Slot>) {
        self.actors.insert(id, (key, slot));
    }

    /// An actor stopped or failed: its slot takes no more commands and is
    /// removed, so that the next command gets a fresh actor. Safe to call
    /// twice.
    pub(crate) fn actor_stopped(&self, id: ActorId) {
        let entry = self.actors.get(&id).map(|entry| entry.value().clone());
        if let Some((key, slot)) = entry {
            slot.close();
            self.remove(&key, &slot);
        }
    }

    /// An actor's handler was dropped: nothing of it (its store handle
    /// included) is left.
    pub(crate) fn actor_dropped(&self, id: ActorId) {
        self.actor_stopped(id);
        self.actors.remove(&id);
    }

    /// Running actors, including those stopping.
    pub(crate) fn running(&self) -> usize {
        self.actors.len()
    }

    /// Actors that take commands.
    pub(crate) fn live(&self) -> usize {
        self.actors
            .iter()
            .filter(|entry| !entry.value().1.is_closed())
            .count()
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::SeqCst)
    }

    /// Past `max_live` live actors, stops the least recently used idle ones
    /// down to 90% of `max_live`, so that one scan of the registry serves
    /// many spawns (amortized O(1) per spawn). Busy actors are skipped: they
    /// are in use, not idle.
    pub(crate) fn evict_if_over(&self, max_live: usize) {
        if self.actors.len() <= max_live || self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        // Every open actor counts, including one whose spawn is finishing
        // (its cell is not published yet); only published ones can be asked.
        let mut live = 0usize;
        let mut candidates: Vec<(u64, SlotKey, Arc<Slot>, ActorCell)> = Vec::new();
        for entry in self.actors.iter() {
            let (key, slot) = entry.value();
            if slot.is_closed() {
                continue;
            }
            live += 1;
            if let Some(cell) = slot.actor.get() {
                candidates.push((
                    slot.last_used(),
                    key.clone(),
                    Arc::clone(slot),
                    cell.clone(),
                ));
            }
        }
        let target = max_live - max_live / 10;
        let excess = live.saturating_sub(target);
        if excess > 0 {
            candidates.sort_unstable_by_key(|(last_used, ..)| *last_used);
            let mut evicted = 0;
            for (_, key, slot, cell) in candidates {
                if evicted == excess {
                    break;
                }
                if slot.close_if_idle() {
                    self.remove(&key, &slot);
                    cell.stop(Some("passivated: least recently used".to_owned()));
                    evicted += 1;
                }
            }
            debug!(
                evicted,
                max_live, "passivated the least recently used aggregates"
            );
        }
        self.evicting.store(false, Ordering::Release);
    }

    /// Another process wrote `version` of `key`'s stream: passivates the
    /// stream's actor if its state is older and it is idle (no command
    /// pending), so that the next command recovers the current state.
    /// Returns whether it did.
    pub(crate) fn passivate_if_behind(&self, key: &SlotKey, version: u64) -> bool {
        let Some(slot) = self.get_open(key) else {
            return false;
        };
        if slot.version.load(Ordering::Acquire) >= version {
            return false;
        }
        // Still spawning: its recovery reads the stream, or meets a conflict.
        let Some(cell) = slot.actor.get().cloned() else {
            return false;
        };
        if !slot.close_if_idle() {
            return false;
        }
        self.remove(key, &slot);
        cell.stop(Some("passivated: written by another process".to_owned()));
        true
    }

    /// Refuses new commands everywhere and asks idle actors to stop; busy
    /// ones stop after their pending commands. Returns how many were asked.
    pub(crate) fn shut_down(&self) -> usize {
        self.shut_down.store(true, Ordering::SeqCst);
        let mut asked = 0;
        for entry in self.slots.iter() {
            let slot = entry.value();
            slot.close();
            // Through the fence: a spawner publishing this slot's actor
            // right now either sees the close or is seen here.
            if slot.stop_if_drained() {
                asked += 1;
            }
        }
        self.slots.clear();
        asked
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus};

    use super::*;

    /// An actor that only waits: it stops when told to, never by itself.
    struct Waits;

    impl Actor for Waits {
        type Msg = ();
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<()>, (): ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    async fn stopped_within(cell: &ActorCell, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if cell.get_status() == ActorStatus::Stopped {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// A registry with one slot and a [`Waits`] actor, not yet published.
    async fn with_waiting_actor() -> (
        Registry,
        SlotKey,
        Arc<Slot>,
        ActorRef<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let registry = Registry::default();
        let key = SlotKey {
            aggregate: TypeId::of::<()>(),
            stream: StreamId::new("test-1").unwrap(),
        };
        let slot = registry.slot(&key).unwrap();
        let (actor, handle) = Actor::spawn(None, Waits, ()).await.unwrap();
        (registry, key, slot, actor, handle)
    }

    #[tokio::test]
    async fn a_place_given_back_unsent_stops_the_actor_of_a_closed_slot() {
        let (registry, _, slot, actor, handle) = with_waiting_actor().await;
        slot.actor.set(actor.get_cell()).unwrap();
        // A caller takes a place; shutdown closes the slot meanwhile and,
        // seeing the place taken, leaves the actor to stop after it.
        let permit = slot.try_acquire(8).unwrap();
        assert_eq!(registry.shut_down(), 0);
        assert!(!stopped_within(&actor.get_cell(), Duration::from_millis(50)).await);
        // The caller is cancelled before sending: nothing will ever reach
        // the actor, so giving the place back must stop it.
        drop(permit);
        assert!(
            stopped_within(&actor.get_cell(), Duration::from_secs(5)).await,
            "the actor of a closed, drained slot kept running"
        );
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn a_lookup_that_meets_shutdown_stops_the_idle_actor_it_closes() {
        let (registry, key, slot, actor, handle) = with_waiting_actor().await;
        slot.actor.set(actor.get_cell()).unwrap();
        // Shutdown has raised its flag but not reached this slot yet; a
        // lookup meanwhile closes and removes it, so shutdown's pass over
        // the slots never sees it.
        registry.shut_down.store(true, Ordering::SeqCst);
        assert!(registry.slot(&key).is_none());
        assert_eq!(registry.shut_down(), 0);
        assert!(
            stopped_within(&actor.get_cell(), Duration::from_secs(2)).await,
            "the idle actor of a slot closed by a lookup kept running"
        );
        handle.await.unwrap();
    }

    #[test]
    fn pending_bound_and_close() {
        let slot = Arc::new(Slot::new());
        let first = slot.try_acquire(2).unwrap();
        let second = slot.try_acquire(2).unwrap();
        assert_eq!(slot.try_acquire(2).unwrap_err(), Refused::Overloaded);
        assert!(!slot.close_if_idle(), "busy slots stay open");
        drop(first);
        second.hand_over();
        assert_eq!(
            slot.pending(),
            1,
            "a handed-over permit is the actor's to release"
        );
        slot.release();
        assert!(slot.close_if_idle());
        assert_eq!(slot.try_acquire(2).unwrap_err(), Refused::Closed);
        assert_eq!(slot.pending(), 0);
    }

    #[test]
    fn closed_slots_are_replaced_and_removal_is_by_identity() {
        let registry = Registry::default();
        let key = SlotKey {
            aggregate: TypeId::of::<()>(),
            stream: StreamId::new("test-1").unwrap(),
        };
        let first = registry.slot(&key).unwrap();
        assert!(Arc::ptr_eq(&first, &registry.slot(&key).unwrap()));
        first.close();
        let second = registry.slot(&key).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        registry.remove(&key, &first);
        assert!(
            registry.get_open(&key).is_some(),
            "removing a stale slot keeps the new one"
        );
        registry.remove(&key, &second);
        assert!(registry.get_open(&key).is_none());
        registry.shut_down();
        assert!(registry.slot(&key).is_none());
        assert!(registry.slots.is_empty());
    }
}
