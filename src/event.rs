//! The vocabulary of the log: stream ids, versions, positions, the events a
//! caller appends ([`NewEvent`]) and the events the store hands back
//! ([`RecordedEvent`]), with their metadata.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::InvalidInput;

/// The longest stream id the store accepts, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 256;
/// The longest event type name the store accepts, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 128;
/// The default largest event (payload plus metadata), in bytes: 1 MiB.
/// [`crate::store::SledStoreConfig::max_event_size`] changes it per store.
pub const DEFAULT_MAX_EVENT_SIZE: usize = 1 << 20;
/// The most events one append may carry.
pub const MAX_EVENTS_PER_APPEND: usize = 10_000;

/// Checks a name (stream id, event type, checkpoint name) against the rules
/// every name shares: not empty, at most `max` bytes, no control characters.
///
/// Control characters are refused because `\0` separates a stream id from the
/// version in the sled key layout (docs/design.md), and because they make
/// logs and error messages lie about what was stored.
pub(crate) fn validate_name(
    what: &'static str,
    name: &str,
    max: usize,
) -> Result<(), InvalidInput> {
    if name.is_empty() {
        return Err(InvalidInput::EmptyName { what });
    }
    if name.len() > max {
        return Err(InvalidInput::NameTooLong {
            what,
            len: name.len(),
            max,
        });
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(InvalidInput::InvalidCharacter { what, character: c });
    }
    Ok(())
}

/// The id of one stream of events, such as `order-123`.
///
/// Guaranteed valid once built: not empty, at most [`MAX_STREAM_ID_LEN`]
/// bytes, no control characters, and not starting with `$` (reserved for
/// system streams such as `$all`). Cloning is cheap (a shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(Arc<str>);

impl StreamId {
    /// Validates and wraps a stream id.
    ///
    /// # Errors
    /// [`InvalidInput`] when the id is empty, too long, holds a control
    /// character or starts with `$`.
    pub fn new(id: impl AsRef<str>) -> Result<Self, InvalidInput> {
        let id = id.as_ref();
        validate_name("stream id", id, MAX_STREAM_ID_LEN)?;
        if id.starts_with('$') {
            return Err(InvalidInput::ReservedStreamId(id.to_owned()));
        }
        Ok(Self(Arc::from(id)))
    }

    /// Builds `category-id`, the stream id of one aggregate instance.
    ///
    /// # Errors
    /// As [`StreamId::new`].
    pub fn for_aggregate(category: &str, id: impl fmt::Display) -> Result<Self, InvalidInput> {
        Self::new(format!("{category}-{id}"))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The category: the part before the first `-` (`order` in `order-123`),
    /// or the whole id when it has no `-`.
    pub fn category(&self) -> &str {
        category_of(&self.0)
    }
}

/// The category of a stream id given as a plain string.
pub(crate) fn category_of(stream: &str) -> &str {
    stream
        .split_once('-')
        .map_or(stream, |(category, _)| category)
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for StreamId {
    type Error = InvalidInput;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidInput;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

/// A stream's version: the number of events in it. The first event of a
/// stream has version 1; [`Version::NONE`] (0) means the stream has no events.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Version(pub u64);

impl Version {
    /// The version of a stream with no events.
    pub const NONE: Version = Version(0);
    /// The version of a stream's first event.
    pub const FIRST: Version = Version(1);
    /// The highest version; reading backward from it starts at the end.
    pub const MAX: Version = Version(u64::MAX);

    /// The next version.
    pub fn next(self) -> Version {
        Version(self.0 + 1)
    }
}

/// A position in the whole log (`$all`). The first event ever appended has
/// position 1; positions have no gaps and increase in commit order.
/// [`Position::START`] (0) is "before the first event".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Position(pub u64);

impl Position {
    /// Before the first event.
    pub const START: Position = Position(0);
    /// The highest position; reading backward from it starts at the end.
    pub const END: Position = Position(u64::MAX);

    /// The next position.
    pub fn next(self) -> Position {
        Position(self.0 + 1)
    }
}

macro_rules! number_formatting {
    ($($name:ident),*) => {$(
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    )*};
}
number_formatting!(Version, Position);

/// What a caller expects a stream's version to be when appending.
/// A wrong expectation fails the append with a conflict and writes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's version must be exactly this (`Exact(Version::NONE)` is
    /// the same as `NoStream`).
    Exact(Version),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` satisfies this expectation.
    pub fn accepts(self, actual: Version) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == Version::NONE,
            ExpectedVersion::StreamExists => actual != Version::NONE,
            ExpectedVersion::Exact(version) => actual == version,
        }
    }
}

/// Correlation, causation and free-form tags carried by an event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The id of the conversation this event belongs to.
    pub correlation_id: Option<Uuid>,
    /// The id of the message (command or event) that caused this event.
    pub causation_id: Option<Uuid>,
    /// Small free-form tags. They count toward the event's size limit.
    pub extra: BTreeMap<String, String>,
}

impl Metadata {
    /// Metadata with these correlation and causation ids.
    pub fn new(correlation_id: Option<Uuid>, causation_id: Option<Uuid>) -> Self {
        Self {
            correlation_id,
            causation_id,
            extra: BTreeMap::new(),
        }
    }

    /// Bytes these metadata add to an event, for the size limit.
    pub(crate) fn approximate_size(&self) -> usize {
        let ids = 2 * 17;
        ids + self
            .extra
            .iter()
            .map(|(key, value)| key.len() + value.len() + 4)
            .sum::<usize>()
    }
}

/// An event to append: its id, type name, schema version, metadata and
/// already-encoded payload (see [`crate::codec::encode_event`] for typed events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// Unique id; appends are idempotent by it. A UUID v7 unless set.
    pub event_id: Uuid,
    /// The event's type name, such as `OrderShipped`.
    pub event_type: String,
    /// The version of the payload's schema, for upcasting on read.
    pub schema_version: u16,
    /// Correlation, causation and tags.
    pub metadata: Metadata,
    /// The encoded payload.
    pub payload: Vec<u8>,
}

impl NewEvent {
    /// An event of this type with this payload, a fresh UUID v7 id, schema
    /// version 1 and no metadata.
    pub fn new(event_type: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            metadata: Metadata::default(),
            payload: payload.into(),
        }
    }

    /// Sets the event id (for example to make a retried request idempotent).
    pub fn with_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    /// Sets the schema version.
    pub fn with_schema_version(mut self, schema_version: u16) -> Self {
        self.schema_version = schema_version;
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The size counted against the event size limit: payload, type name and
    /// metadata.
    pub fn size(&self) -> usize {
        self.payload.len() + self.event_type.len() + self.metadata.approximate_size()
    }
}

/// Checks one append's events against the limits every backend shares: at
/// least one and at most [`MAX_EVENTS_PER_APPEND`] events, valid event
/// types and metadata keys, no event larger than `max_event_size` (the
/// error names `setting`, the backend's setting that raises it), no event
/// id twice. A backend calls it before anything else in an append.
///
/// # Errors
/// The first [`InvalidInput`] found; nothing may then be written.
pub fn validate_append(
    events: &[NewEvent],
    max_event_size: usize,
    setting: &'static str,
) -> Result<(), InvalidInput> {
    if events.is_empty() {
        return Err(InvalidInput::EmptyAppend);
    }
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(InvalidInput::TooManyEvents {
            count: events.len(),
            max: MAX_EVENTS_PER_APPEND,
        });
    }
    let mut ids = std::collections::HashSet::with_capacity(events.len());
    for event in events {
        validate_name("event type", &event.event_type, MAX_EVENT_TYPE_LEN)?;
        for key in event.metadata.extra.keys() {
            validate_name("metadata key", key, MAX_EVENT_TYPE_LEN)?;
        }
        if event.size() > max_event_size {
            return Err(InvalidInput::EventTooLarge {
                size: event.size(),
                max: max_event_size,
                setting,
            });
        }
        if !ids.insert(event.event_id) {
            return Err(InvalidInput::DuplicateEventIdInAppend(event.event_id));
        }
    }
    Ok(())
}

/// An event as stored: what was appended plus where and when it landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedEvent {
    /// The event's unique id.
    pub event_id: Uuid,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version within the stream (1-based, no gaps).
    pub version: Version,
    /// Its position in the whole log (1-based, no gaps, commit order).
    pub position: Position,
    /// Its type name.
    pub event_type: String,
    /// The schema version of its payload.
    pub schema_version: u16,
    /// When the store committed it, in microseconds since the Unix epoch.
    pub recorded_at_micros: u64,
    /// Correlation, causation and tags.
    pub metadata: Metadata,
    /// The encoded payload.
    pub payload: Vec<u8>,
}

impl RecordedEvent {
    /// When the store committed it.
    pub fn recorded_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.recorded_at_micros)
    }
}

/// Microseconds since the Unix epoch, now.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}

/// Versions and positions assigned by one append. Both ranges are
/// contiguous: the append's events got versions `first_version..=last_version`
/// and positions `first_position..=last_position`, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AppendResult {
    /// The version of the append's first event.
    pub first_version: Version,
    /// The version of its last event: the stream's version after the append.
    pub last_version: Version,
    /// The global position of its first event.
    pub first_position: Position,
    /// The global position of its last event.
    pub last_position: Position,
}

/// Which way a read goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadDirection {
    /// Oldest first, starting at the given version or position (inclusive).
    Forward,
    /// Newest first, starting at the given version or position (inclusive).
    Backward,
}

/// Which events of `$all` a read or subscription wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum EventFilter {
    /// Every event.
    #[default]
    All,
    /// Events whose stream is in this category (`order` for `order-123`).
    Category(String),
    /// Events of any of these types.
    EventTypes(Vec<String>),
    /// Events of this one stream.
    Stream(StreamId),
}

impl EventFilter {
    /// Whether an event with this stream and type passes the filter.
    pub fn matches(&self, stream: &str, event_type: &str) -> bool {
        match self {
            EventFilter::All => true,
            EventFilter::Category(category) => category_of(stream) == category,
            EventFilter::EventTypes(types) => types.iter().any(|t| t == event_type),
            EventFilter::Stream(id) => id.as_str() == stream,
        }
    }
}

/// The latest snapshot of a stream: the aggregate's encoded state at a
/// version. Snapshots are only a cache; losing one changes no state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The stream version the state includes.
    pub version: Version,
    /// The encoded state.
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_id_rules() {
        assert!(StreamId::new("order-1").is_ok());
        assert!(matches!(
            StreamId::new(""),
            Err(InvalidInput::EmptyName { .. })
        ));
        assert!(matches!(
            StreamId::new("x".repeat(MAX_STREAM_ID_LEN + 1)),
            Err(InvalidInput::NameTooLong { .. })
        ));
        assert!(StreamId::new("x".repeat(MAX_STREAM_ID_LEN)).is_ok());
        assert!(matches!(
            StreamId::new("a\0b"),
            Err(InvalidInput::InvalidCharacter {
                character: '\0',
                ..
            })
        ));
        assert!(matches!(
            StreamId::new("$all"),
            Err(InvalidInput::ReservedStreamId(_))
        ));
    }

    #[test]
    fn category_is_prefix_before_first_dash() {
        assert_eq!(StreamId::new("order-12-3").unwrap().category(), "order");
        assert_eq!(StreamId::new("plain").unwrap().category(), "plain");
    }

    #[test]
    fn expected_version_cases() {
        let none = Version::NONE;
        let three = Version(3);
        assert!(ExpectedVersion::Any.accepts(none) && ExpectedVersion::Any.accepts(three));
        assert!(ExpectedVersion::NoStream.accepts(none));
        assert!(!ExpectedVersion::NoStream.accepts(three));
        assert!(!ExpectedVersion::StreamExists.accepts(none));
        assert!(ExpectedVersion::StreamExists.accepts(three));
        assert!(ExpectedVersion::Exact(three).accepts(three));
        assert!(!ExpectedVersion::Exact(Version(2)).accepts(three));
        assert!(ExpectedVersion::Exact(none).accepts(none));
    }
}
