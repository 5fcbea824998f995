//! [`verify_aggregate`]: for one aggregate type, every snapshot equals a
//! full replay of its stream (invariant I5: a snapshot is only a cache).
//! The command-line tool cannot know a service's types, so a service calls
//! this itself (see `examples/verify_aggregate.rs`).

use serde::Serialize;

use super::error::OpsError;
use super::inspect::Inspect;
use crate::codec::{decode_event, decode_value};
use crate::event::{ReadDirection, StreamId, Version};
use crate::runtime::Aggregate;

/// Events read per page while replaying.
const PAGE: usize = 1024;

/// A snapshot of `A` that is not what a full replay gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AggregateMismatch {
    /// The stream.
    pub stream: String,
    /// The snapshot's version.
    pub version: u64,
    /// What differs: the snapshot's state and the replayed one (`Debug`),
    /// or why one of them could not be built.
    pub detail: String,
}

/// What [`verify_aggregate`] checked and found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AggregateCheck {
    /// The aggregate type's category.
    pub category: String,
    /// Snapshots of that category compared with a replay.
    pub snapshots_checked: u64,
    /// Events replayed for the comparisons.
    pub events_replayed: u64,
    /// Every snapshot that differs.
    pub mismatches: Vec<AggregateMismatch>,
}

impl AggregateCheck {
    /// Whether every snapshot equals its replay.
    pub fn is_sound(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Checks every snapshot of aggregate type `A` (streams of `A::CATEGORY`)
/// against a full replay of its stream up to the snapshot's version, with
/// `A`'s own `apply` and upcasters. Reads only. A snapshot that does not
/// decode as `A`, a stream whose events do not decode, or a stream shorter
/// than the snapshot is a mismatch too.
///
/// # Errors
/// Only when the store cannot be listed or read.
pub async fn verify_aggregate<A>(store: &dyn Inspect) -> Result<AggregateCheck, OpsError>
where
    A: Aggregate + PartialEq + std::fmt::Debug,
{
    let mut check = AggregateCheck {
        category: A::CATEGORY.to_owned(),
        snapshots_checked: 0,
        events_replayed: 0,
        mismatches: Vec::new(),
    };
    for record in store.snapshots().await? {
        let Ok(stream) = StreamId::new(&record.stream) else {
            continue;
        };
        if stream.category() != A::CATEGORY {
            continue;
        }
        check.snapshots_checked += 1;
        let mismatch = |version: u64, detail: String| AggregateMismatch {
            stream: record.stream.clone(),
            version,
            detail,
        };
        let Some(snapshot) = store.load_snapshot(&stream).await? else {
            // Deleted since it was listed, or a record that does not decode.
            if let Err(error) = &record.version {
                check.mismatches.push(mismatch(
                    0,
                    format!("the snapshot record does not decode: {error}"),
                ));
            }
            continue;
        };
        let version = snapshot.version.0;
        let cached = match decode_value::<A>(&snapshot.payload) {
            Ok(state) => state,
            Err(error) => {
                check.mismatches.push(mismatch(
                    version,
                    format!("the snapshot does not decode: {error}"),
                ));
                continue;
            }
        };
        match replay::<A>(store, &stream, version, &mut check.events_replayed).await? {
            Err(detail) => check.mismatches.push(mismatch(version, detail)),
            Ok(replayed) if replayed != cached => check.mismatches.push(mismatch(
                version,
                format!("snapshot {cached:?}, full replay {replayed:?}"),
            )),
            Ok(_) => {}
        }
    }
    Ok(check)
}

/// `A` after applying `stream`'s events 1..=version to `A::default()`, or
/// why it cannot be built.
async fn replay<A: Aggregate>(
    store: &dyn Inspect,
    stream: &StreamId,
    version: u64,
    replayed: &mut u64,
) -> Result<Result<A, String>, OpsError> {
    let mut state = A::default();
    let mut next = Version::FIRST;
    while next.0 <= version {
        let page = store
            .read_stream(stream, next, ReadDirection::Forward, PAGE)
            .await?;
        if page.is_empty() {
            return Ok(Err(format!(
                "the stream ends at version {} before the snapshot's version",
                next.0 - 1
            )));
        }
        for event in page.iter().take_while(|e| e.version.0 <= version) {
            match decode_event::<A::Event>(event) {
                Ok(decoded) => state.apply(&decoded),
                Err(error) => return Ok(Err(format!("version {}: {error}", event.version))),
            }
            *replayed += 1;
            next = event.version.next();
        }
        if page.last().is_some_and(|e| e.version.0 >= version) {
            break;
        }
    }
    Ok(Ok(state))
}
