//! The group-commit writer: one thread owns every append. It takes the
//! queued appends as one group, decides each (idempotency, expected
//! version, versions and positions), writes the group as one sled batch,
//! flushes and syncs once, then publishes the commit and answers every
//! waiter (docs/design.md, "The writer and group commit").

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};
use uuid::Uuid;

use super::ack_mark::AckMark;
use super::durability::Syncer;
use super::format::{
    chunk_at, corrupt, decode_record, encode_record, record_utf8, stage_chunks, META_HEAD,
};
use super::stream_index::{Due, StreamIndex};
use super::Durability;
use crate::error::{AppendError, StoreError};
use crate::event::{
    now_micros, AppendResult, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamId, Version,
};
use crate::store::{check_idempotency, IdempotencyCheck, LivePublisher, StoredId};

/// A request to the writer thread.
#[derive(Debug)]
pub(super) enum WriteRequest {
    Append {
        stream: StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Result<AppendResult, AppendError>>,
    },
    /// Makes everything written so far durable (checkpoints, read models).
    Sync {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Shutdown {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// The writer thread's state. Owns every write to the `log` tree.
pub(super) struct Writer {
    pub(super) db: sled::Db,
    pub(super) log: sled::Tree,
    pub(super) feed: Arc<LivePublisher>,
    pub(super) receiver: mpsc::Receiver<WriteRequest>,
    pub(super) last_position: u64,
    pub(super) syncer: Syncer,
    pub(super) max_group_commit: usize,
    pub(super) path: PathBuf,
    pub(super) min_free_bytes: u64,
    /// Stream heads as committed. The writer is the only one that appends
    /// (sled's file lock keeps other processes out), so an entry is exact;
    /// it is updated once a group is applied and, where the durability mode
    /// asks for it, synced; never by a failed one.
    pub(super) heads: HashMap<StreamId, u64>,
    pub(super) head_cache_capacity: usize,
    pub(super) metrics: crate::metrics::StoreMetrics,
    /// The acknowledged mark, kept at the last durable position (`None`
    /// under [`Durability::Buffered`]).
    pub(super) mark: Option<AckMark>,
    /// The stream index, whose tail the writer records each durable group
    /// into; the indexer thread writes it to sled.
    pub(super) streams: Arc<StreamIndex>,
    pub(super) indexer: Option<Indexer>,
}

/// The thread that writes the stream index's tail to sled, woken when the
/// tail is due a flush.
pub(super) struct Indexer {
    wake: std::sync::mpsc::SyncSender<()>,
    /// Cuts a merge of id runs short at shutdown (opening removes what it
    /// wrote), so that closing the store never waits for one.
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Indexer {
    fn spawn(
        streams: Arc<StreamIndex>,
        log: sled::Tree,
        counters: Arc<super::Counters>,
    ) -> std::io::Result<Self> {
        let (wake, wakes) = std::sync::mpsc::sync_channel::<()>(1);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("annals-indexer".into())
            .spawn(move || {
                while wakes.recv().is_ok() {
                    let flushed = streams
                        .flush_if_due(&log)
                        .and_then(|()| streams.merge(&log, &stopping, true));
                    if let Err(e) = flushed {
                        let why = format!("writing the store's indexes failed: {e}");
                        error!(error = %why, "the store refuses writes until reopened");
                        // The writer takes it up at its next group.
                        let _ = counters.poisoned.set(why);
                        return;
                    }
                }
            })?;
        Ok(Self { wake, stop, thread })
    }

    /// Waits for the flush under way, if any (a merge stops early), and
    /// stops the thread.
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(self.wake);
        let _ = self.thread.join();
    }
}

/// One append of a group, decided but not yet durable.
struct Decided {
    reply: oneshot::Sender<Result<AppendResult, AppendError>>,
    outcome: Result<AppendResult, AppendError>,
}

impl Writer {
    pub(super) fn run(mut self) {
        match Indexer::spawn(
            Arc::clone(&self.streams),
            self.log.clone(),
            Arc::clone(&self.syncer.counters),
        ) {
            Ok(indexer) => self.indexer = Some(indexer),
            // The writer then flushes the tail itself.
            Err(e) => warn!(error = %e, "could not start the stream indexer thread"),
        }
        let mut group = Vec::new();
        let mut shutdown = None;
        while shutdown.is_none() {
            let Some(first) = self.receiver.blocking_recv() else {
                break;
            };
            group.push(first);
            while group.len() < self.max_group_commit {
                match self.receiver.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            shutdown = self.commit_group(&mut group);
        }
        // The tail's entries go to sled before the last flush, so that the
        // next open has no tail to rebuild.
        if let Some(indexer) = self.indexer.take() {
            indexer.stop();
        }
        if self.poisoned().is_none() {
            if let Err(e) = self.streams.flush(&self.log, false) {
                self.poison(format!("writing the stream index failed: {e}"));
            }
        }
        // Drop and shutdown both end here: what was applied gets flushed,
        // unless a write already failed: sled then waits forever for a flush
        // the failed I/O cannot complete, and the store is poisoned anyway.
        let result = match self.poisoned() {
            None => self.flush_and_sync(),
            Some(why) => Err(why),
        };
        if let (Ok(()), Some(mark)) = (&result, &mut self.mark) {
            if let Err(e) = mark.record_durably(self.last_position) {
                warn!(error = %e, "could not sync the acknowledged mark");
            }
        }
        if let Err(why) = &result {
            error!(error = %why, "final flush of the event store failed");
            // What reached the disk is unknown, as after any failed write;
            // poisoned, the store's sled handles are leaked below, so that no
            // drop waits for a flush that cannot complete.
            self.poison(why.clone());
        }
        self.receiver.close();
        while let Ok(request) = self.receiver.try_recv() {
            refuse(request, || StoreError::Closed);
        }
        // Nothing commits after this point: subscribers get FeedError::Closed.
        self.feed.close();
        if let Some(reply) = shutdown {
            let _ = reply.send(result.map_err(StoreError::Poisoned));
        }
        if self.poisoned().is_some() {
            leak_sled_handles(&self.db);
        }
        debug!("event store writer stopped");
    }

    /// Why the store refuses writes, once a write failed (the writer's or
    /// the indexer's): what sled holds is then unknown, so every later write
    /// is refused until the store is reopened.
    fn poisoned(&self) -> Option<String> {
        self.syncer.counters.poisoned.get().cloned()
    }

    /// Records a durable group in the stream index's tail, and has the tail
    /// flushed when it is due: by the indexer, or here when the indexer is
    /// missing or far behind (so that the tail stays bounded).
    fn index_streams(&self, committed: &[RecordedEvent]) {
        let due = match self.streams.record(committed) {
            Ok(due) => due,
            Err(e) => {
                self.poison(format!("recording the stream index failed: {e}"));
                return;
            }
        };
        let inline = match (due, &self.indexer) {
            (Due::No, _) => false,
            (Due::Indexer, Some(indexer)) => {
                // Full: a wake is already waiting.
                let _ = indexer.wake.try_send(());
                false
            }
            (Due::Indexer, None) | (Due::Writer, _) => true,
        };
        if inline {
            // Without an indexer thread the writer also merges the id
            // runs, or they would only grow in number.
            let never = std::sync::atomic::AtomicBool::new(false);
            let flushed = self
                .streams
                .flush(&self.log, false)
                .and_then(|()| match self.indexer {
                    Some(_) => Ok(()),
                    None => self.streams.merge(&self.log, &never, false),
                });
            if let Err(e) = flushed {
                self.poison(format!("writing the store's indexes failed: {e}"));
            }
        }
    }

    fn flush_and_sync(&mut self) -> Result<(), String> {
        let _timer = self.metrics.time_sync();
        self.db.flush().map_err(|e| e.to_string())?;
        self.syncer.sync().map_err(|e| e.to_string())
    }

    /// Commits one group; returns the shutdown reply if the group asked to
    /// stop (requests after a shutdown in the same group are refused).
    fn commit_group(
        &mut self,
        group: &mut Vec<WriteRequest>,
    ) -> Option<oneshot::Sender<Result<(), StoreError>>> {
        let mut batch = sled::Batch::default();
        // Sized for one event per request, the common case, so that a
        // group of thousands does not rehash and regrow as it is decided.
        let requests = group.len();
        let mut heads: HashMap<StreamId, u64> = HashMap::with_capacity(requests);
        let mut new_ids: HashMap<Uuid, StoredId> = HashMap::with_capacity(requests);
        let mut next_position = self.last_position + 1;
        let mut decided: Vec<Decided> = Vec::with_capacity(requests);
        let mut syncs = Vec::new();
        let mut committed: Vec<RecordedEvent> = Vec::with_capacity(requests);
        let mut records: Vec<Vec<u8>> = Vec::with_capacity(requests);
        let mut shutdown = None;
        let recorded_at_micros = now_micros();
        let no_space = self.check_space(group);

        for request in group.drain(..) {
            if shutdown.is_some() {
                refuse(request, || StoreError::Closed);
                continue;
            }
            match request {
                WriteRequest::Shutdown { reply } => shutdown = Some(reply),
                WriteRequest::Sync { reply } => syncs.push(reply),
                WriteRequest::Append {
                    stream,
                    expected,
                    events,
                    reply,
                } => {
                    let outcome = match (self.poisoned(), no_space) {
                        (Some(why), _) => Err(StoreError::Poisoned(why).into()),
                        (None, Some((available, needed))) => {
                            Err(StoreError::DiskFull { available, needed }.into())
                        }
                        (None, None) => self.decide(
                            &stream,
                            expected,
                            events,
                            &mut Pending {
                                heads: &mut heads,
                                new_ids: &mut new_ids,
                                next_position: &mut next_position,
                                committed: &mut committed,
                                records: &mut records,
                                recorded_at_micros,
                            },
                        ),
                    };
                    // sled writes on reads too (page consolidation), so an
                    // I/O error met while deciding is a failed write: what
                    // sled holds is then unknown, exactly as after a failed
                    // flush.
                    if let Err(AppendError::Store(StoreError::Backend(e))) = &outcome {
                        self.poison(e.to_string());
                    }
                    decided.push(Decided { reply, outcome });
                }
            }
        }

        let wrote = !committed.is_empty();
        let result = if let Some(why) = self.poisoned() {
            // Poisoned part-way through this group: apply none of it.
            Err(why)
        } else if wrote {
            // The group's positions are consecutive from the last one: a
            // refused append takes none.
            stage_chunks(&mut batch, self.last_position + 1, &records);
            batch.insert(META_HEAD, &(next_position - 1).to_be_bytes());
            self.log.apply_batch(batch).map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        let needs_sync = wrote || !syncs.is_empty();
        let result = result.and_then(|()| match self.syncer.durability {
            Durability::Buffered { .. } if syncs.is_empty() => Ok(()),
            _ if needs_sync => self.flush_and_sync(),
            _ => Ok(()),
        });

        match result {
            Ok(()) => {
                self.last_position = next_position - 1;
                // After the group's sync, before its answers: the mark never
                // runs ahead of the durable log, and covers every answer.
                if let (true, Some(mark)) = (wrote, &mut self.mark) {
                    if let Err(e) = mark.record(self.last_position) {
                        // The appends are durable; only the check on the
                        // next open is weaker.
                        warn!(error = %e, "could not write the acknowledged mark");
                    }
                }
                let counters = &self.syncer.counters;
                let appended = decided.iter().filter(|d| d.outcome.is_ok()).count() as u64;
                counters.appends.fetch_add(appended, Ordering::Relaxed);
                if wrote {
                    counters.group_commits.fetch_add(1, Ordering::Relaxed);
                }
                self.metrics
                    .group_committed(appended, committed.len() as u64);
                // In the stream index before the head moves: a reader that
                // sees the head finds the events' stream entries.
                if wrote {
                    self.index_streams(&committed);
                }
                // Publish (which moves the head) before answering, so that a
                // caller whose append returned sees it in `head_position()`
                // and a subscriber has it on the feed, as with MemoryStore.
                if wrote {
                    self.feed.publish(committed.into());
                }
                // Past capacity, start over: bounded memory, and the
                // streams in use refill it at one index descent each.
                if self.heads.len() + heads.len() > self.head_cache_capacity {
                    self.heads.clear();
                }
                if heads.len() <= self.head_cache_capacity {
                    self.heads.extend(heads);
                }
                for Decided { reply, outcome } in decided {
                    let _ = reply.send(outcome);
                }
                for reply in syncs {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(why) => {
                self.metrics.group_failed();
                self.poison(why.clone());
                for Decided { reply, outcome } in decided {
                    let outcome = outcome.and(Err(StoreError::Poisoned(why.clone()).into()));
                    let _ = reply.send(outcome);
                }
                for reply in syncs {
                    let _ = reply.send(Err(StoreError::Poisoned(why.clone())));
                }
            }
        }
        shutdown
    }

    /// Refuses every later write until the store is reopened; the first
    /// failure is the one kept.
    fn poison(&self, why: String) {
        if self.syncer.counters.poisoned.set(why.clone()).is_ok() {
            error!(error = %why, "a write failed; the store refuses writes until reopened");
        }
    }

    /// Whether the filesystem has room for this group: `Some((available,
    /// needed))` when it has not. One statvfs per group commit.
    fn check_space(&self, group: &[WriteRequest]) -> Option<(u64, u64)> {
        if self.min_free_bytes == 0 {
            return None;
        }
        let adds: usize = group
            .iter()
            .map(|request| match request {
                WriteRequest::Append { events, .. } => events.iter().map(|e| e.size() + 128).sum(),
                _ => 0,
            })
            .sum();
        if adds == 0 {
            return None;
        }
        // sled writes a record into its log and again when it rewrites the
        // page, so count the group twice.
        let needed = self.min_free_bytes.saturating_add(2 * adds as u64);
        match fs4::available_space(&self.path) {
            Ok(available) if available < needed => Some((available, needed)),
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "cannot read the free space of the store's filesystem");
                None
            }
        }
    }

    /// Decides one append of the group: idempotency, expected version, then
    /// versions and positions, staged into the batch.
    fn decide(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        pending: &mut Pending<'_>,
    ) -> Result<AppendResult, AppendError> {
        let check = check_idempotency(stream, &events, |id| self.lookup_id(id, pending.new_ids))?;
        if let IdempotencyCheck::Retry(result) = check? {
            return Ok(result);
        }
        let actual = match pending.heads.get(stream).or_else(|| self.heads.get(stream)) {
            Some(&version) => version,
            None => self.streams.head(&self.log, stream)?,
        };
        if !expected.accepts(Version(actual)) {
            return Err(AppendError::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: Version(actual),
            });
        }
        let first_position = *pending.next_position;
        let count = events.len() as u64;
        let recorded: Vec<RecordedEvent> = events
            .into_iter()
            .zip(0u64..)
            .map(|(event, offset)| RecordedEvent {
                event_id: event.event_id,
                stream_id: stream.clone(),
                version: Version(actual + 1 + offset),
                position: Position(first_position + offset),
                event_type: event.event_type,
                schema_version: event.schema_version,
                recorded_at_micros: pending.recorded_at_micros,
                metadata: event.metadata,
                payload: event.payload,
            })
            .collect();
        // Encode every record before staging any, so that a failure leaves
        // nothing of this append in the group's batch (I4).
        let encoded = recorded
            .iter()
            .map(encode_record)
            .collect::<Result<Vec<_>, _>>()?;
        pending.records.extend(encoded);
        for event in &recorded {
            pending.new_ids.insert(
                event.event_id,
                StoredId {
                    stream: stream.clone(),
                    version: event.version,
                    position: event.position,
                },
            );
        }
        pending.committed.extend(recorded);
        *pending.next_position += count;
        pending.heads.insert(stream.clone(), actual + count);
        Ok(AppendResult {
            first_version: Version(actual + 1),
            last_version: Version(actual + count),
            first_position: Position(first_position),
            last_position: Position(first_position + count - 1),
        })
    }

    fn lookup_id(
        &self,
        id: Uuid,
        new_ids: &HashMap<Uuid, StoredId>,
    ) -> Result<Option<StoredId>, StoreError> {
        if let Some(stored) = new_ids.get(&id) {
            return Ok(Some(stored.clone()));
        }
        // A fresh id costs the tail's lookup and the runs' filters, no
        // sled read.
        let Some(position) = self.streams.event_position(&self.log, id)? else {
            return Ok(None);
        };
        let chunk = chunk_at(&self.log, position)?
            .ok_or_else(|| corrupt(format_args!("event id {id} points at missing {position}")))?;
        let bytes = chunk
            .record(position)
            .expect("the chunk holds the position");
        let record = decode_record(position, bytes)?;
        if record.event_id != id {
            return Err(corrupt(format_args!(
                "event id {id} points at {position}, which holds another"
            )));
        }
        Ok(Some(StoredId {
            stream: StreamId::new(record_utf8(position, record.stream)?).map_err(corrupt)?,
            version: Version(record.version),
            position: Position(position),
        }))
    }
}

/// What the appends of a group have staged so far.
struct Pending<'a> {
    heads: &'a mut HashMap<StreamId, u64>,
    new_ids: &'a mut HashMap<Uuid, StoredId>,
    next_position: &'a mut u64,
    committed: &'a mut Vec<RecordedEvent>,
    /// The encoded records of `committed`, written as chunks at the end.
    records: &'a mut Vec<Vec<u8>>,
    recorded_at_micros: u64,
}

fn refuse(request: WriteRequest, error: impl Fn() -> StoreError) {
    match request {
        WriteRequest::Append { reply, .. } => {
            let _ = reply.send(Err(error().into()));
        }
        WriteRequest::Sync { reply } | WriteRequest::Shutdown { reply } => {
            let _ = reply.send(Err(error()));
        }
    }
}

/// Keeps sled from flushing when a poisoned store is dropped. sled 0.34
/// flushes in `Drop` until the flush succeeds, which never happens after
/// some write failures (a full disk), so the drop would hang the thread.
/// One leaked `Db` keeps sled's map of trees (read models included) alive,
/// so no tree's drop runs that flush. The directory stays locked until the
/// process exits; reopening it then recovers the durable prefix.
fn leak_sled_handles(db: &sled::Db) {
    std::mem::forget(db.clone());
}
