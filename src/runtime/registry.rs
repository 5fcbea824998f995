//! The registry of aggregates in memory: one entry per stream, found
//! through a dashmap. A *live* entry is a [`Slot`]: the stream's actor
//! (spawned once, however many callers race), the count of pending commands
//! that bounds its mailbox, and its last use, for least-recently-used and
//! idle passivation. An *idle* entry is the state a passivated actor left
//! behind ([`Warm`]), with no actor: the next command starts an actor from
//! it without reading the store. Idle entries are a bounded cache
//! ([`crate::RuntimeConfig::max_idle_aggregates`]), dropped oldest first, and
//! only a cache (I5): a dropped one reloads from the store, and a stale one
//! (another process appended meanwhile) is caught by the append's expected
//! version. One sweep task per runtime passivates idle actors, instead of a
//! timer per actor.

use std::any::{Any, TypeId};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use ractor::{ActorCell, ActorId};
use tokio::sync::OnceCell;
use tokio::time::{Instant, MissedTickBehavior};
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

/// An idle aggregate's state, as its last actor left it: the actor's
/// `WarmState<A>` behind `dyn Any`, since one registry holds every
/// aggregate type (the key's type says which).
pub(crate) type WarmState = Box<dyn Any + Send + Sync>;

/// What the registry holds for one stream.
enum Held {
    /// An actor runs for the stream (or is starting, or stopping).
    Live(Arc<Slot>),
    /// No actor: the state its last actor left, warm for the next command.
    Idle(Warm),
}

/// An idle entry.
struct Warm {
    state: WarmState,
    /// The registry clock at the aggregate's last use, for dropping the
    /// longest idle first.
    last_used: u64,
}

/// One stream's live entry.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Pending commands (sent or about to be sent, not yet answered by the
    /// actor), plus the [`CLOSED`] bit. One atomic, so that "close only if
    /// nothing is pending" and "acquire only if not closed" cannot interleave:
    /// a command is never sent to an actor that has decided to stop.
    state: AtomicUsize,
    /// The registry clock at the last use, for least-recently-used eviction.
    last_used: AtomicU64,
    /// When the actor last answered (or the slot was made), in microseconds
    /// since the registry's epoch, for the idle sweep.
    last_active: AtomicU64,
    /// The actor, spawned by the first caller; the others wait for it.
    pub(crate) actor: OnceCell<ActorCell>,
    /// Why the actor's spawn (its recovery, mostly) failed, set before the
    /// slot closes: the callers that waited for that spawn all get its
    /// error, rather than each replaying the stream again in turn. Boxed:
    /// every live slot carries the field, and almost none fills it.
    pub(crate) failure: OnceLock<Box<SpawnFailure>>,
    /// The idle state this slot's actor starts from (taken by its
    /// `pre_start`), when the stream was idle in the registry. A std mutex:
    /// taken once, never across an await.
    warm: Mutex<Option<WarmState>>,
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
    fn new(now: u64) -> Self {
        Self {
            state: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
            last_active: AtomicU64::new(now),
            actor: OnceCell::new(),
            failure: OnceLock::new(),
            warm: Mutex::new(None),
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

    /// The idle state to start from, if the stream was idle: taken once.
    pub(crate) fn take_warm(&self) -> Option<WarmState> {
        self.warm
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
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
            // back unsent would wait for the idle sweep (and `shutdown` for
            // it), since only answered commands make it check.
            slot.stop_if_drained();
        }
    }
}

/// A running actor, as the registry knows it.
#[derive(Debug)]
struct Running {
    key: SlotKey,
    slot: Arc<Slot>,
    /// Its aggregate type's idle timeout, in microseconds.
    idle_timeout: u64,
}

/// Every live slot, running actor and idle state of one runtime.
pub(crate) struct Registry {
    slots: DashMap<SlotKey, Held>,
    /// Running actors by id, so that the supervisor, which learns of a
    /// stopped or failed actor by its id only, can clean up its slot, and
    /// the sweep can find the idle ones.
    actors: DashMap<ActorId, Running>,
    /// A logical clock for least-recently-used order: cheaper than reading
    /// the time on every command, and never equal for two uses.
    clock: AtomicU64,
    /// Idle entries in `slots`.
    idle: AtomicUsize,
    /// The most idle entries kept; 0 keeps none.
    max_idle: usize,
    /// The origin of [`Slot::last_active`] (tokio's clock, which tests pause).
    epoch: Instant,
    evicting: AtomicBool,
    trimming: AtomicBool,
    shut_down: AtomicBool,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("running", &self.actors.len())
            .field("idle", &self.idle())
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry that keeps up to `max_idle` idle states.
    pub(crate) fn new(max_idle: usize) -> Self {
        Self {
            slots: DashMap::new(),
            actors: DashMap::new(),
            clock: AtomicU64::new(0),
            idle: AtomicUsize::new(0),
            max_idle,
            epoch: Instant::now(),
            evicting: AtomicBool::new(false),
            trimming: AtomicBool::new(false),
            shut_down: AtomicBool::new(false),
        }
    }

    /// Microseconds since the registry's epoch.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The open slot of `key`, created if missing or closed, and marked as
    /// just used; made from the stream's idle state when it has one (the
    /// slot's actor then starts from it). `None` once the runtime is shut
    /// down.
    pub(crate) fn slot(&self, key: &SlotKey) -> Option<Arc<Slot>> {
        let slot = match self.slots.entry(key.clone()) {
            Entry::Occupied(mut entry) => match entry.get() {
                Held::Live(slot) if !slot.is_closed() => Arc::clone(slot),
                _ => {
                    let fresh = Arc::new(Slot::new(self.now()));
                    if let Held::Idle(warm) = entry.insert(Held::Live(Arc::clone(&fresh))) {
                        self.uncount(1);
                        *fresh.warm.lock().unwrap_or_else(|p| p.into_inner()) = Some(warm.state);
                    }
                    fresh
                }
            },
            Entry::Vacant(entry) => {
                let fresh = Arc::new(Slot::new(self.now()));
                entry.insert(Held::Live(Arc::clone(&fresh)));
                fresh
            }
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
            .and_then(|held| match held.value() {
                Held::Live(slot) => Some(Arc::clone(slot)),
                Held::Idle(_) => None,
            })
            .filter(|slot| !slot.is_closed())
    }

    /// Whether `key` is idle: its state is held with no actor.
    pub(crate) fn is_idle(&self, key: &SlotKey) -> bool {
        self.slots
            .get(key)
            .is_some_and(|held| matches!(held.value(), Held::Idle(_)))
    }

    /// Idle states held.
    pub(crate) fn idle(&self) -> usize {
        self.idle.load(Ordering::SeqCst)
    }

    /// Removes `slot` from the map if it is still the live one for `key`.
    pub(crate) fn remove(&self, key: &SlotKey, slot: &Arc<Slot>) {
        self.slots.remove_if(
            key,
            |_, held| matches!(held, Held::Live(current) if Arc::ptr_eq(current, slot)),
        );
    }

    /// Drops the idle state of `key`, if it has one: its next command
    /// reloads from the store. For a caller that learned that the stream
    /// changed elsewhere (the state would be caught up anyway, by the
    /// append's expected version, but one conflict later).
    #[allow(dead_code)]
    pub(crate) fn forget_idle(&self, key: &SlotKey) -> bool {
        let removed = self
            .slots
            .remove_if(key, |_, held| matches!(held, Held::Idle(_)))
            .is_some();
        if removed {
            self.uncount(1);
        }
        removed
    }

    /// The actor of `slot` stopped cleanly (passivated) and left `state`:
    /// the stream becomes idle with it, if `slot` is still its live entry
    /// (a newer one means a command came meanwhile and a new actor reloaded
    /// from the store: the state is dropped) and the runtime keeps idle
    /// states. Otherwise the slot is just removed.
    pub(crate) fn park(&self, key: &SlotKey, slot: &Arc<Slot>, state: WarmState) {
        if self.max_idle == 0 || self.is_shut_down() {
            self.remove(key, slot);
            return;
        }
        // Counted before the entry shows, so that the count never falls
        // below the entries (a command may take this one at once).
        self.idle.fetch_add(1, Ordering::SeqCst);
        let parked = match self.slots.get_mut(key) {
            Some(mut held) if matches!(&*held, Held::Live(current) if Arc::ptr_eq(current, slot)) =>
            {
                *held = Held::Idle(Warm {
                    state,
                    last_used: slot.last_used(),
                });
                true
            }
            _ => false,
        };
        if !parked {
            self.uncount(1);
        } else if self.is_shut_down() {
            // Shutdown cleared the map before this entry went in.
            self.forget_idle(key);
        } else {
            self.trim();
        }
    }

    fn uncount(&self, entries: usize) {
        let _ = self
            .idle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |idle| {
                Some(idle.saturating_sub(entries))
            });
    }

    /// Past the maximum of idle states, drops the longest idle down to 90%
    /// of it, so that one scan serves many parks (amortized O(1) each).
    /// Concurrent parks leave it to the one trimming, which looks again
    /// once done (all `SeqCst`: a park either sees the trim running or is
    /// counted before its last look).
    fn trim(&self) {
        while self.idle.load(Ordering::SeqCst) > self.max_idle {
            if self.trimming.swap(true, Ordering::SeqCst) {
                return;
            }
            self.trim_once();
            self.trimming.store(false, Ordering::SeqCst);
        }
    }

    fn trim_once(&self) {
        let target = self.max_idle - self.max_idle / 10;
        let excess = self.idle().saturating_sub(target);
        if excess == 0 {
            return;
        }
        let mut stamps: Vec<u64> = self
            .slots
            .iter()
            .filter_map(|held| match held.value() {
                Held::Idle(warm) => Some(warm.last_used),
                Held::Live(_) => None,
            })
            .collect();
        // Stamps are unique: the `excess` oldest are those at or below the
        // cutoff.
        let cutoff = if excess >= stamps.len() {
            u64::MAX
        } else {
            *stamps.select_nth_unstable(excess - 1).1
        };
        drop(stamps);
        let mut dropped = 0usize;
        self.slots.retain(|_, held| match held {
            Held::Idle(warm) if dropped < excess && warm.last_used <= cutoff => {
                dropped += 1;
                false
            }
            _ => true,
        });
        self.uncount(dropped);
        debug!(
            dropped,
            max_idle = self.max_idle,
            "dropped the longest idle aggregate states"
        );
    }

    /// An actor started for `slot` (called from its `pre_start`); it is
    /// passivated after `idle_timeout` without a command.
    pub(crate) fn actor_started(
        &self,
        id: ActorId,
        key: SlotKey,
        slot: Arc<Slot>,
        idle_timeout: Duration,
    ) {
        let idle_timeout = u64::try_from(idle_timeout.as_micros()).unwrap_or(u64::MAX);
        self.actors.insert(
            id,
            Running {
                key,
                slot,
                idle_timeout,
            },
        );
    }

    /// The actor of `slot` answered a command: it is active now.
    pub(crate) fn touch(&self, slot: &Slot) {
        slot.last_active.store(self.now(), Ordering::Relaxed);
    }

    /// An actor stopped or failed: its slot takes no more commands and is
    /// removed (unless it became idle), so that the next command gets a
    /// fresh actor. Safe to call twice.
    pub(crate) fn actor_stopped(&self, id: ActorId) {
        let entry = self
            .actors
            .get(&id)
            .map(|running| (running.key.clone(), Arc::clone(&running.slot)));
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
            .filter(|running| !running.slot.is_closed())
            .count()
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::SeqCst)
    }

    /// Past `max_live` live actors, stops the least recently used idle ones
    /// down to 90% of `max_live`, so that one scan of the registry serves
    /// many spawns (amortized O(1) per spawn). Busy actors are skipped: they
    /// are in use, not idle. A stopped actor leaves its state idle (see
    /// [`Registry::park`]).
    pub(crate) fn evict_if_over(&self, max_live: usize) {
        if self.actors.len() <= max_live || self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        // Every open actor counts, including one whose spawn is finishing
        // (its cell is not published yet); only published ones can be asked.
        let mut live = 0usize;
        let mut candidates: Vec<(u64, Arc<Slot>)> = Vec::new();
        for running in self.actors.iter() {
            let slot = &running.slot;
            if slot.is_closed() {
                continue;
            }
            live += 1;
            if slot.actor.get().is_some() {
                candidates.push((slot.last_used(), Arc::clone(slot)));
            }
        }
        let target = max_live - max_live / 10;
        let excess = live.saturating_sub(target);
        if excess > 0 {
            candidates.sort_unstable_by_key(|(last_used, _)| *last_used);
            let mut evicted = 0;
            for (_, slot) in candidates {
                if evicted == excess {
                    break;
                }
                if slot.close_if_idle() {
                    if let Some(cell) = slot.actor.get() {
                        cell.stop(Some("passivated: least recently used".to_owned()));
                    }
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

    /// Stops the actors that answered no command for their type's idle
    /// timeout (those with a command pending are in use). Their states
    /// stay idle (see [`Registry::park`]). Returns how many it stopped.
    pub(crate) fn passivate_idle(&self) -> usize {
        let now = self.now();
        let mut stopped = 0;
        for running in self.actors.iter() {
            let slot = &running.slot;
            let idle_for = now.saturating_sub(slot.last_active.load(Ordering::Relaxed));
            if idle_for < running.idle_timeout || slot.is_closed() {
                continue;
            }
            // An actor not published yet has a spawner that will see the
            // close (see `stop_if_drained`).
            if slot.close_if_idle() {
                if let Some(cell) = slot.actor.get() {
                    cell.stop(Some("passivated: idle".to_owned()));
                }
                stopped += 1;
            }
        }
        if stopped > 0 {
            debug!(stopped, "passivated idle aggregates");
        }
        stopped
    }

    /// Refuses new commands everywhere, asks idle actors to stop (busy ones
    /// stop after their pending commands) and drops the idle states.
    /// Returns how many actors were asked.
    pub(crate) fn shut_down(&self) -> usize {
        self.shut_down.store(true, Ordering::SeqCst);
        let mut asked = 0;
        for held in self.slots.iter() {
            if let Held::Live(slot) = held.value() {
                slot.close();
                // Through the fence: a spawner publishing this slot's actor
                // right now either sees the close or is seen here.
                if slot.stop_if_drained() {
                    asked += 1;
                }
            }
        }
        self.slots.clear();
        self.idle.store(0, Ordering::SeqCst);
        asked
    }
}

/// Starts the runtime's one sweep task: every `period`, it passivates the
/// actors idle past their timeout. It ends with the runtime (shutdown, or
/// the registry gone); the returned handle aborts it sooner.
pub(crate) fn start_sweep(registry: &Arc<Registry>, period: Duration) -> tokio::task::AbortHandle {
    let registry: Weak<Registry> = Arc::downgrade(registry);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick is at once; the next one is a period away.
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(registry) = registry.upgrade() else {
                return;
            };
            if registry.is_shut_down() {
                return;
            }
            registry.passivate_idle();
        }
    })
    .abort_handle()
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
        let registry = Registry::new(16);
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
        let slot = Arc::new(Slot::new(0));
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
        let registry = Registry::new(16);
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
