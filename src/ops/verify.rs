//! [`verify`]: the store's invariants checked end to end, each violation
//! reported with where it is.

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;
use uuid::Uuid;

use super::error::OpsError;
use super::inspect::Inspect;
use super::stats::PAGE;
use crate::event::{EventFilter, Position, ReadDirection, StreamId, Version};

/// Violations kept in a report; more are counted in [`Violation::More`].
const MAX_VIOLATIONS: usize = 10_000;

/// One broken invariant, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "violation", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Violation {
    /// No event between these positions of the log.
    PositionGap {
        /// The last position before the gap (0: the start).
        after: u64,
        /// The next position found.
        next: u64,
    },
    /// The stored head and the last event of the log disagree.
    HeadMismatch {
        /// The head.
        head: u64,
        /// The last event's position.
        last_event: u64,
    },
    /// The record at this position does not decode.
    UndecodableEvent {
        /// Its position.
        position: u64,
        /// The decoder's error.
        error: String,
    },
    /// A stream's versions skip or repeat.
    VersionGap {
        /// The stream.
        stream: String,
        /// Where the out-of-sequence event is.
        position: u64,
        /// The version expected there.
        expected: u64,
        /// The version found.
        found: u64,
    },
    /// Reading a stream (through its index) disagrees with the log.
    StreamRead {
        /// The stream.
        stream: String,
        /// The first difference.
        detail: String,
    },
    /// An event has no entry, or a wrong one, in one of the backend's
    /// indexes.
    NotIndexed {
        /// The event's position.
        position: u64,
        /// Which index.
        index: String,
        /// What is wrong.
        detail: String,
    },
    /// An index entry that points at no event, or at another event.
    BadIndexEntry {
        /// Which index.
        index: String,
        /// The entry's key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// A snapshot at a version its stream has not reached.
    SnapshotAhead {
        /// The stream.
        stream: String,
        /// The snapshot's version.
        snapshot_version: u64,
        /// The stream's version.
        stream_version: u64,
    },
    /// A snapshot record that does not decode.
    UndecodableSnapshot {
        /// The stream.
        stream: String,
        /// The decoder's error.
        error: String,
    },
    /// More violations than a report keeps.
    More {
        /// How many more.
        count: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::PositionGap { after, next } => write!(
                f,
                "gap in the log: no event between positions {after} and {next}"
            ),
            Violation::HeadMismatch { head, last_event } => write!(
                f,
                "the head is {head} but the last event is at position {last_event}"
            ),
            Violation::UndecodableEvent { position, error } => {
                write!(
                    f,
                    "the event at position {position} does not decode: {error}"
                )
            }
            Violation::VersionGap {
                stream,
                position,
                expected,
                found,
            } => write!(
                f,
                "{stream}: version {found} at position {position}, expected version {expected}"
            ),
            Violation::StreamRead { stream, detail } => {
                write!(
                    f,
                    "{stream}: reading the stream disagrees with the log: {detail}"
                )
            }
            Violation::NotIndexed {
                position,
                index,
                detail,
            } => write!(
                f,
                "the event at position {position} is not in the {index} index: {detail}"
            ),
            Violation::BadIndexEntry { index, key, detail } => {
                write!(f, "{index} index entry {key}: {detail}")
            }
            Violation::SnapshotAhead {
                stream,
                snapshot_version,
                stream_version,
            } => write!(
                f,
                "{stream}: snapshot at version {snapshot_version}, \
                 but the stream is at version {stream_version}"
            ),
            Violation::UndecodableSnapshot { stream, error } => {
                write!(f, "{stream}: the snapshot does not decode: {error}")
            }
            Violation::More { count } => write!(f, "... and {count} more violations"),
        }
    }
}

/// What [`verify`] checked and found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The backend's name.
    pub backend: String,
    /// The head the check ran up to.
    pub head: u64,
    /// Events read.
    pub events: u64,
    /// Streams whose reads were compared with the log.
    pub streams: u64,
    /// Snapshots checked.
    pub snapshots: u64,
    /// Backend index entries checked (0 where the backend keeps its own
    /// indexes, as PostgreSQL does).
    pub index_entries: u64,
    /// Every violation found, in the order found.
    pub violations: Vec<Violation>,
}

impl VerifyReport {
    /// Whether no violation was found.
    pub fn is_sound(&self) -> bool {
        self.violations.is_empty()
    }

    fn found(&mut self, violation: Violation) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(violation);
        } else if let Some(Violation::More { count }) = self.violations.last_mut() {
            *count += 1;
        } else {
            self.violations.push(Violation::More { count: 1 });
        }
    }
}

/// One stream's events as the log holds them: (version, position, id).
type Track = Vec<(u64, u64, Uuid)>;

/// Checks the store's invariants up to the head read at the start, reading
/// only: positions 1..head with no gap; every record decodes; each
/// stream's versions 1..n with no gap; reading each stream (through the
/// backend's index) gives exactly the log's events of that stream; every
/// snapshot decodes and is not ahead of its stream; and the backend's own
/// checks ([`Inspect::check_backend`]: on sled, every index entry points at
/// its event and every event is indexed). Memory: about 40 bytes per event.
///
/// # Errors
/// Only when the store cannot be read at all; a damaged record is a
/// [`Violation`] in the report.
pub async fn verify(store: &dyn Inspect) -> Result<VerifyReport, OpsError> {
    let head = store.stored_head().await?;
    let mut report = VerifyReport {
        backend: store.backend_name().to_owned(),
        head: head.0,
        events: 0,
        streams: 0,
        snapshots: 0,
        index_entries: 0,
        violations: Vec::new(),
    };
    let mut streams: HashMap<StreamId, Track> = HashMap::new();
    let mut last = 0u64;
    let mut from = 1u64;
    while from <= head.0 {
        let page = store
            .read_all(
                Position(from),
                ReadDirection::Forward,
                PAGE,
                &EventFilter::All,
            )
            .await;
        let page = match page {
            Ok(page) => page,
            Err(error) => {
                // A record that does not decode fails the page; the next
                // read starts past it.
                report.found(Violation::UndecodableEvent {
                    position: from,
                    error: error.to_string(),
                });
                last = from;
                from += 1;
                continue;
            }
        };
        let Some(final_event) = page.last() else {
            break;
        };
        from = final_event.position.0 + 1;
        for event in page.iter().filter(|e| e.position <= head) {
            let position = event.position.0;
            if position != last + 1 {
                report.found(Violation::PositionGap {
                    after: last,
                    next: position,
                });
            }
            last = position;
            report.events += 1;
            let track = streams.entry(event.stream_id.clone()).or_default();
            let expected = track.last().map_or(1, |(version, _, _)| version + 1);
            if event.version.0 != expected {
                report.found(Violation::VersionGap {
                    stream: event.stream_id.to_string(),
                    position,
                    expected,
                    found: event.version.0,
                });
            }
            track.push((event.version.0, position, event.event_id));
        }
    }
    if last != head.0 {
        report.found(Violation::HeadMismatch {
            head: head.0,
            last_event: last,
        });
    }

    let mut names: Vec<&StreamId> = streams.keys().collect();
    names.sort();
    for stream in names {
        report.streams += 1;
        if let Some(detail) = compare_stream(store, stream, &streams[stream], head).await {
            report.found(Violation::StreamRead {
                stream: stream.to_string(),
                detail,
            });
        }
    }

    for snapshot in store.snapshots().await? {
        report.snapshots += 1;
        let stream_version = StreamId::new(&snapshot.stream)
            .ok()
            .and_then(|id| streams.get(&id))
            .and_then(|track| track.last())
            .map_or(0, |(version, _, _)| *version);
        match snapshot.version {
            Err(error) => report.found(Violation::UndecodableSnapshot {
                stream: snapshot.stream,
                error,
            }),
            Ok(version) if version > stream_version => report.found(Violation::SnapshotAhead {
                stream: snapshot.stream,
                snapshot_version: version,
                stream_version,
            }),
            Ok(_) => {}
        }
    }

    let (violations, index_entries) = store.check_backend().await?;
    report.index_entries = index_entries;
    for violation in violations {
        report.found(violation);
    }
    Ok(report)
}

/// The first difference between reading `stream` and the log's events of
/// it, if any.
async fn compare_stream(
    store: &dyn Inspect,
    stream: &StreamId,
    track: &Track,
    head: Position,
) -> Option<String> {
    let mut expected = track.iter();
    let mut from = Version::FIRST;
    loop {
        let page = match store
            .read_stream(stream, from, ReadDirection::Forward, PAGE)
            .await
        {
            Ok(page) => page,
            Err(error) => return Some(format!("reading from version {from} failed: {error}")),
        };
        let Some(final_event) = page.last() else {
            break;
        };
        from = final_event.version.next();
        for event in page.iter().filter(|e| e.position <= head) {
            let Some(&(version, position, id)) = expected.next() else {
                return Some(format!(
                    "the stream read has version {} at position {}, which the log does not",
                    event.version, event.position
                ));
            };
            if (event.version.0, event.position.0, event.event_id) != (version, position, id)
                || &event.stream_id != stream
            {
                return Some(format!(
                    "version {version} is at position {position} (event {id}) in the log, \
                     the stream read gives {} version {} at position {} (event {})",
                    event.stream_id, event.version, event.position, event.event_id
                ));
            }
        }
        if page.len() < PAGE {
            break;
        }
    }
    expected.next().map(|(version, position, _)| {
        format!("the stream read ends before version {version} (position {position})")
    })
}
