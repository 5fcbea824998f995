//! [`export`] and [`import`]: a store's log copied through a file, every
//! id, version, position, timestamp and metadata kept, so that a log moves
//! between backends (sled to PostgreSQL and back) and a copy continues
//! where the original was. The file format (version
//! [`EXPORT_FORMAT_VERSION`]) is described byte by byte in docs/design.md,
//! "Export files": a magic, then checksummed frames (a header, batches of
//! events, a trailer with the event count and a checksum of the whole
//! file). It is written and read as a stream: memory holds one batch.
//! Snapshots and checkpoints are not carried: snapshots are caches and
//! checkpoints belong to read models, both rebuilt from the log (I5, I8).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::OpsError;
use super::inspect::Inspect;
use crate::error::StoreError;
use crate::event::{
    EventFilter, Metadata, Position, ReadDirection, RecordedEvent, StreamId, Version,
};
use crate::store::postgres::PostgresStore;
use crate::store::sled::ops::SledLoader;

/// The first bytes of every export file.
pub const EXPORT_MAGIC: &[u8; 8] = b"ANNALSEX";
/// The export file format this build writes and reads.
pub const EXPORT_FORMAT_VERSION: u32 = 1;

const HEADER: u8 = b'H';
const EVENTS: u8 = b'E';
const TRAILER: u8 = b'T';
/// A frame body larger than this is a damaged length, not a frame.
const MAX_FRAME: u32 = 256 << 20;
/// A batch (one frame, one atomic write on import) holds at most this many
/// events or about this many bytes.
const BATCH_EVENTS: usize = 1000;
const BATCH_BYTES: usize = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    source_backend: String,
    source_format: u32,
    annals_version: String,
    first_position: u64,
    created_at_micros: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Trailer {
    events: u64,
    last_position: u64,
    /// Big-endian, fixed width: a varint's length would follow the
    /// checksum's value, so two exports of the same events (whose headers
    /// differ only in their creation time) could differ in length.
    file_crc32: [u8; 4],
}

#[derive(Debug, Serialize, Deserialize)]
struct ExportedEvent {
    position: u64,
    event_id: Uuid,
    stream: String,
    version: u64,
    event_type: String,
    schema_version: u16,
    recorded_at_micros: u64,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    extra: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

impl From<&RecordedEvent> for ExportedEvent {
    fn from(event: &RecordedEvent) -> Self {
        Self {
            position: event.position.0,
            event_id: event.event_id,
            stream: event.stream_id.as_str().to_owned(),
            version: event.version.0,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            recorded_at_micros: event.recorded_at_micros,
            correlation_id: event.metadata.correlation_id,
            causation_id: event.metadata.causation_id,
            extra: event
                .metadata
                .extra
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            payload: event.payload.clone(),
        }
    }
}

impl ExportedEvent {
    fn into_recorded(self) -> Result<RecordedEvent, String> {
        let stream_id = StreamId::new(&self.stream).map_err(|e| e.to_string())?;
        Ok(RecordedEvent {
            event_id: self.event_id,
            stream_id,
            version: Version(self.version),
            position: Position(self.position),
            event_type: self.event_type,
            schema_version: self.schema_version,
            recorded_at_micros: self.recorded_at_micros,
            metadata: Metadata {
                correlation_id: self.correlation_id,
                causation_id: self.causation_id,
                extra: self.extra.into_iter().collect(),
            },
            payload: self.payload,
        })
    }
}

/// How [`export`] runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExportOptions {
    /// The first position to export (1, the default: the whole log). A
    /// file that starts later imports only into a store whose head is just
    /// before it.
    pub from: Position,
    /// Continue an export that was interrupted (or extend a finished one
    /// with what the store committed since) instead of refusing an
    /// existing file.
    pub resume: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            from: Position(1),
            resume: false,
        }
    }
}

impl ExportOptions {
    /// Exports from `position` on.
    pub fn from(mut self, position: Position) -> Self {
        self.from = position;
        self
    }

    /// Resumes an interrupted export into the same file.
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ExportSummary {
    /// The file's first position.
    pub first_position: u64,
    /// The file's last position (`first_position - 1` when it holds none).
    pub last_position: u64,
    /// Events in the file.
    pub events: u64,
    /// Events written by this call (fewer than `events` after a resume).
    pub written: u64,
    /// The file's size.
    pub bytes: u64,
}

/// What [`import`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ImportSummary {
    /// The file's first position.
    pub first_position: u64,
    /// The file's last position.
    pub last_position: u64,
    /// Events written into the store.
    pub imported: u64,
    /// Events of the file the store held already (a resumed import).
    pub already_present: u64,
    /// The store's head afterwards.
    pub head: u64,
}

/// A store [`import`] can write into: events written exactly as recorded
/// (positions, versions, ids, timestamps, metadata), in batches that
/// continue its head, each all or nothing.
#[async_trait]
pub trait ImportTarget: Send + Sync {
    /// The last position stored.
    async fn import_head(&self) -> Result<Position, StoreError>;

    /// The event stored at `position`, if any.
    async fn import_event_at(
        &self,
        position: Position,
    ) -> Result<Option<RecordedEvent>, StoreError>;

    /// Writes `events` (consecutive positions right after the head), all or
    /// nothing.
    ///
    /// # Errors
    /// [`OpsError::Refused`] when an event cannot continue the store
    /// (nothing written); the store's.
    async fn import_batch(&self, events: Vec<RecordedEvent>) -> Result<(), OpsError>;

    /// Makes every batch durable and releases what the import held.
    async fn import_finish(&self) -> Result<(), StoreError>;
}

#[async_trait]
impl ImportTarget for PostgresStore {
    async fn import_head(&self) -> Result<Position, StoreError> {
        self.ops_stored_head().await
    }

    async fn import_event_at(
        &self,
        position: Position,
    ) -> Result<Option<RecordedEvent>, StoreError> {
        event_at(self, position).await
    }

    /// One transaction under the head lock, committed with
    /// `synchronous_commit = on`; other processes may append meanwhile
    /// (then the next batch is refused: it no longer continues the head).
    async fn import_batch(&self, events: Vec<RecordedEvent>) -> Result<(), OpsError> {
        Ok(self.ops_load(events).await?)
    }

    async fn import_finish(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

async fn event_at(
    store: &dyn crate::EventStore,
    position: Position,
) -> Result<Option<RecordedEvent>, StoreError> {
    let found = store
        .read_all(position, ReadDirection::Forward, 1, &EventFilter::All)
        .await
        .map_err(|e| match e {
            crate::error::ReadError::Store(e) => e,
            crate::error::ReadError::InvalidInput(e) => StoreError::InvalidInput(e),
        })?;
    Ok(found.into_iter().find(|e| e.position == position))
}

/// Imports into a sled store directory that no store has open (creating
/// the store if the directory is empty or missing). A [`SledStore`]'s
/// writer thread owns its log while it is open, so an import into sled is
/// offline: it holds the directory's lock itself until
/// [`ImportTarget::import_finish`] (or the drop of this value), and
/// opening a [`SledStore`] on it meanwhile is [`StoreError::InUse`].
///
/// [`SledStore`]: crate::SledStore
#[derive(Debug)]
pub struct SledImport {
    loader: Mutex<Option<SledLoader>>,
}

impl SledImport {
    /// Takes the store at `path` for an import.
    ///
    /// # Errors
    /// As [`SledStore::open`](crate::SledStore::open): [`StoreError::InUse`]
    /// when a store (of this process or another) has it open,
    /// [`StoreError::FormatMismatch`], [`StoreError::NotAStore`], ...
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Ok(Self {
            loader: Mutex::new(Some(SledLoader::open(path.as_ref())?)),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut SledLoader) -> Result<T, OpsError>,
    ) -> Result<T, OpsError> {
        let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        match loader.as_mut() {
            Some(loader) => f(loader),
            None => Err(StoreError::Closed.into()),
        }
    }
}

#[async_trait]
impl ImportTarget for SledImport {
    async fn import_head(&self) -> Result<Position, StoreError> {
        self.with(|loader| Ok(loader.head())).map_err(store_error)
    }

    async fn import_event_at(
        &self,
        position: Position,
    ) -> Result<Option<RecordedEvent>, StoreError> {
        self.with(|loader| Ok(loader.event_at(position)?))
            .map_err(store_error)
    }

    async fn import_batch(&self, events: Vec<RecordedEvent>) -> Result<(), OpsError> {
        self.with(|loader| Ok(loader.load(&events)?))
    }

    /// Flushes and fdatasyncs the store as its writer does after a group
    /// commit, then releases the directory.
    async fn import_finish(&self) -> Result<(), StoreError> {
        let loader = self.loader.lock().unwrap_or_else(|p| p.into_inner()).take();
        match loader {
            Some(loader) => loader.finish(),
            None => Ok(()),
        }
    }
}

fn store_error(error: OpsError) -> StoreError {
    match error {
        OpsError::Store(e) => e,
        other => StoreError::Corrupt(other.to_string()),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OpsError + '_ {
    move |source| OpsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes frames, keeping the checksum of everything written.
struct FrameWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    fn raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    fn frame(&mut self, kind: u8, body: &[u8]) -> std::io::Result<()> {
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(body.len() as u32).to_be_bytes());
        let mut frame_crc = crc32fast::Hasher::new();
        frame_crc.update(&head);
        frame_crc.update(body);
        self.raw(&head)?;
        self.raw(body)?;
        self.raw(&frame_crc.finalize().to_be_bytes())
    }
}

/// One frame as read.
struct Frame {
    kind: u8,
    body: Vec<u8>,
    /// The file's checksum over every byte before this frame.
    crc_before: u32,
    /// Where the frame ends.
    end: u64,
}

/// Reads frames, checking each one's checksum.
struct FrameReader<R: Read> {
    input: R,
    crc: crc32fast::Hasher,
    offset: u64,
    path: PathBuf,
}

impl<R: Read> FrameReader<R> {
    fn bad(&self, reason: impl Into<String>) -> OpsError {
        OpsError::BadFile {
            path: self.path.clone(),
            offset: self.offset,
            reason: reason.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` at a clean end of file
    /// before the first byte.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, OpsError> {
        let mut read = 0;
        while read < buf.len() {
            match self.input.read(&mut buf[read..]) {
                Ok(0) if read == 0 => return Ok(false),
                Ok(0) => return Err(self.bad("the file ends inside a frame")),
                Ok(n) => read += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(&self.path)(e)),
            }
        }
        Ok(true)
    }

    fn start(&mut self) -> Result<(), OpsError> {
        let mut magic = [0u8; 12];
        if !self.fill(&mut magic)? || &magic[..8] != EXPORT_MAGIC {
            return Err(self.bad("not an annals export file"));
        }
        let version = u32::from_be_bytes(magic[8..].try_into().expect("4 bytes"));
        if version != EXPORT_FORMAT_VERSION {
            return Err(self.bad(format!(
                "export format version {version}; this build reads version {EXPORT_FORMAT_VERSION}"
            )));
        }
        self.crc.update(&magic);
        self.offset = 12;
        Ok(())
    }

    /// The next frame; `None` at the end of the file.
    fn next(&mut self) -> Result<Option<Frame>, OpsError> {
        let crc_before = self.crc.clone().finalize();
        let mut head = [0u8; 5];
        if !self.fill(&mut head)? {
            return Ok(None);
        }
        let length = u32::from_be_bytes(head[1..].try_into().expect("4 bytes"));
        if length > MAX_FRAME {
            return Err(self.bad(format!("a frame of {length} bytes: damaged length")));
        }
        let mut body = vec![0u8; length as usize];
        let mut crc = [0u8; 4];
        if !self.fill(&mut body)? && length > 0 || !self.fill(&mut crc)? {
            return Err(self.bad("the file ends inside a frame"));
        }
        let mut frame_crc = crc32fast::Hasher::new();
        frame_crc.update(&head);
        frame_crc.update(&body);
        if frame_crc.finalize() != u32::from_be_bytes(crc) {
            return Err(self.bad("frame checksum mismatch: the file is damaged"));
        }
        self.crc.update(&head);
        self.crc.update(&body);
        self.crc.update(&crc);
        self.offset += 9 + u64::from(length);
        Ok(Some(Frame {
            kind: head[0],
            body,
            crc_before,
            end: self.offset,
        }))
    }

    fn decode<T: for<'de> Deserialize<'de>>(&self, body: &[u8]) -> Result<T, OpsError> {
        postcard::from_bytes(body).map_err(|e| self.bad(format!("a frame does not decode: {e}")))
    }
}

fn open_reader(path: &Path) -> Result<FrameReader<BufReader<File>>, OpsError> {
    let file = File::open(path).map_err(io(path))?;
    let mut reader = FrameReader {
        input: BufReader::with_capacity(1 << 20, file),
        crc: crc32fast::Hasher::new(),
        offset: 0,
        path: path.to_path_buf(),
    };
    reader.start()?;
    Ok(reader)
}

/// What a checked file holds.
struct Scanned {
    header: Header,
    /// The last complete batch's last position, and its last event.
    last_position: u64,
    last_event: Option<RecordedEvent>,
    events: u64,
    /// Where the last complete events frame (or the header) ends.
    kept_end: u64,
    /// The checksum of the file up to `kept_end`.
    crc_kept: Option<crc32fast::Hasher>,
    trailer: Option<Trailer>,
}

/// Reads the whole file, checking every frame, the positions' sequence and
/// the trailer. With `partial`, a damaged or missing tail is tolerated
/// (for resuming an export): the scan stops at the last sound frame.
fn scan_file(path: &Path, partial: bool) -> Result<Scanned, OpsError> {
    let mut reader = open_reader(path)?;
    let header_frame = reader
        .next()?
        .filter(|frame| frame.kind == HEADER)
        .ok_or_else(|| reader.bad("the file has no header"))?;
    let header: Header = reader.decode(&header_frame.body)?;
    let mut scanned = Scanned {
        last_position: header.first_position.saturating_sub(1),
        header,
        last_event: None,
        events: 0,
        kept_end: header_frame.end,
        crc_kept: Some(reader.crc.clone()),
        trailer: None,
    };
    loop {
        let frame = match reader.next() {
            Ok(Some(frame)) => frame,
            Ok(None) if partial => break,
            Ok(None) => return Err(reader.bad("the file ends without its trailer: incomplete")),
            Err(e) if partial => {
                tracing::warn!(error = %e, "resuming the export before a damaged tail");
                break;
            }
            Err(e) => return Err(e),
        };
        match frame.kind {
            EVENTS => {
                let events: Vec<ExportedEvent> = reader.decode(&frame.body)?;
                let mut last = None;
                for event in events {
                    if event.position != scanned.last_position + 1 {
                        return Err(reader.bad(format!(
                            "position {} follows {}: the file is not a gapless log",
                            event.position, scanned.last_position
                        )));
                    }
                    scanned.last_position = event.position;
                    scanned.events += 1;
                    last = Some(event);
                }
                if let Some(last) = last {
                    let position = last.position;
                    let event = last
                        .into_recorded()
                        .map_err(|e| reader.bad(format!("position {position}: {e}")))?;
                    scanned.last_event = Some(event);
                }
                scanned.kept_end = frame.end;
                scanned.crc_kept = Some(reader.crc.clone());
            }
            TRAILER => {
                let trailer: Trailer = reader.decode(&frame.body)?;
                if u32::from_be_bytes(trailer.file_crc32) != frame.crc_before
                    || trailer.events != scanned.events
                    || trailer.last_position != scanned.last_position
                {
                    return Err(reader.bad(
                        "the trailer does not match the file: frames are missing or reordered",
                    ));
                }
                if reader.next()?.is_some() {
                    return Err(reader.bad("data after the trailer"));
                }
                scanned.trailer = Some(trailer);
                break;
            }
            other => return Err(reader.bad(format!("unknown frame kind {other:#04x}"))),
        }
    }
    Ok(scanned)
}

/// What an export file holds, as [`inspect_export`] reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ExportFileSummary {
    /// The backend the file was exported from.
    pub source_backend: String,
    /// That store's format version.
    pub source_format: u32,
    /// The annals version that wrote the file.
    pub annals_version: String,
    /// When the export started, in microseconds since the epoch.
    pub created_at_micros: u64,
    /// The first position.
    pub first_position: u64,
    /// The last position (`first_position - 1` when it holds no event).
    pub last_position: u64,
    /// Events in the file.
    pub events: u64,
}

/// Checks a whole export file (every frame's checksum, gapless positions,
/// the trailer's count and whole-file checksum) and says what it holds,
/// reading it once as a stream. [`import`] does the same before writing.
///
/// # Errors
/// [`OpsError::BadFile`] when the file is damaged, truncated or not an
/// export file; [`OpsError::Io`].
pub fn inspect_export(path: impl AsRef<Path>) -> Result<ExportFileSummary, OpsError> {
    let scanned = scan_file(path.as_ref(), false)?;
    Ok(ExportFileSummary {
        source_backend: scanned.header.source_backend,
        source_format: scanned.header.source_format,
        annals_version: scanned.header.annals_version,
        created_at_micros: scanned.header.created_at_micros,
        first_position: scanned.header.first_position,
        last_position: scanned.last_position,
        events: scanned.events,
    })
}

/// Exports the store's log to `path`: events from `options.from` up to the
/// head read at the start, in position order, in checksummed batches, then
/// a trailer; synced to disk before returning. Reads only.
///
/// With `options.resume`, an existing file is checked, its damaged or
/// incomplete tail (an export killed mid-way) cut off, and the export
/// continues after its last sound batch; the file must hold the same
/// events as the store at that position ([`OpsError::Diverged`]
/// otherwise). `progress(done, total)` is called after each batch.
///
/// # Errors
/// [`OpsError::FileExists`] when the file exists and `resume` is off;
/// [`OpsError::BadFile`] when an existing file is not an export;
/// [`OpsError::Io`]; the store's.
pub async fn export(
    store: &dyn Inspect,
    path: impl AsRef<Path>,
    options: ExportOptions,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<ExportSummary, OpsError> {
    let path = path.as_ref();
    let head = store.stored_head().await?.0;
    let mut exists = path.exists();
    if exists && !options.resume {
        return Err(OpsError::FileExists(path.to_path_buf()));
    }
    if exists && header_incomplete(path)? {
        // Killed before its header was whole: nothing to keep.
        std::fs::remove_file(path).map_err(io(path))?;
        exists = false;
    }
    let (mut writer, mut last, mut events, first) = if exists {
        let scanned = scan_file(path, true)?;
        if let Some(expected) = &scanned.last_event {
            let stored = event_at(store.as_event_store(), expected.position).await?;
            if stored.as_ref() != Some(expected) {
                return Err(OpsError::Diverged {
                    position: expected.position.0,
                    reason: "the store holds another event there than the file".into(),
                });
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        file.set_len(scanned.kept_end).map_err(io(path))?;
        let mut file = file;
        file.seek(SeekFrom::End(0)).map_err(io(path))?;
        let writer = FrameWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: scanned.crc_kept.expect("kept with the frame"),
            bytes: scanned.kept_end,
        };
        (
            writer,
            scanned.last_position,
            scanned.events,
            scanned.header.first_position,
        )
    } else {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io(path))?;
        let mut writer = FrameWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            bytes: 0,
        };
        let first = options.from.0.max(1);
        let header = Header {
            source_backend: store.backend_name().to_owned(),
            source_format: store.format_version(),
            annals_version: env!("CARGO_PKG_VERSION").to_owned(),
            first_position: first,
            created_at_micros: crate::event::now_micros(),
        };
        let mut magic = EXPORT_MAGIC.to_vec();
        magic.extend_from_slice(&EXPORT_FORMAT_VERSION.to_be_bytes());
        writer.raw(&magic).map_err(io(path))?;
        writer
            .frame(HEADER, &postcard::to_stdvec(&header).map_err(encode_error)?)
            .map_err(io(path))?;
        (writer, first - 1, 0, first)
    };
    let total = head.saturating_sub(first - 1);
    let mut written = 0;
    progress(events, total);
    while last < head {
        let page = store
            .read_all(
                Position(last + 1),
                ReadDirection::Forward,
                BATCH_EVENTS,
                &EventFilter::All,
            )
            .await?;
        let mut batch = Vec::with_capacity(page.len());
        let mut bytes = 0;
        for event in page.iter().take_while(|e| e.position.0 <= head) {
            if event.position.0 != last + 1 {
                return Err(StoreError::Corrupt(format!(
                    "the log has a gap after position {last}: run `verify`"
                ))
                .into());
            }
            last = event.position.0;
            bytes += event.payload.len() + 64;
            batch.push(ExportedEvent::from(event));
            if bytes >= BATCH_BYTES {
                break;
            }
        }
        if batch.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "the log ends at position {last} before its head {head}: run `verify`"
            ))
            .into());
        }
        events += batch.len() as u64;
        written += batch.len() as u64;
        let body = postcard::to_stdvec(&batch).map_err(encode_error)?;
        writer.frame(EVENTS, &body).map_err(io(path))?;
        progress(events, total);
    }
    let trailer = Trailer {
        events,
        last_position: last,
        file_crc32: writer.crc.clone().finalize().to_be_bytes(),
    };
    writer
        .frame(
            TRAILER,
            &postcard::to_stdvec(&trailer).map_err(encode_error)?,
        )
        .map_err(io(path))?;
    let bytes = writer.bytes;
    let file = writer
        .out
        .into_inner()
        .map_err(|e| io(path)(e.into_error()))?;
    file.sync_all().map_err(io(path))?;
    Ok(ExportSummary {
        first_position: first,
        last_position: last,
        events,
        written,
        bytes,
    })
}

/// Whether `path` is the start of an export file cut before its header
/// frame was complete (and so holds nothing worth keeping). Any other file
/// is left to [`scan_file`] to accept or refuse.
fn header_incomplete(path: &Path) -> Result<bool, OpsError> {
    let mut start = EXPORT_MAGIC.to_vec();
    start.extend_from_slice(&EXPORT_FORMAT_VERSION.to_be_bytes());
    let mut head = Vec::new();
    File::open(path)
        .map_err(io(path))?
        .take(start.len() as u64)
        .read_to_end(&mut head)
        .map_err(io(path))?;
    if head.len() < start.len() {
        return Ok(start.starts_with(&head));
    }
    if head != start {
        return Ok(false);
    }
    let mut reader = open_reader(path)?;
    Ok(!matches!(reader.next(), Ok(Some(frame)) if frame.kind == HEADER))
}

fn encode_error(error: postcard::Error) -> OpsError {
    StoreError::Corrupt(format!("cannot encode an export frame: {error}")).into()
}

/// Imports an export file into `target`: first the whole file is checked
/// (every frame's checksum, gapless positions, the trailer's count and
/// whole-file checksum), so a damaged or truncated file writes nothing;
/// then its events are written batch by batch, each batch atomic, exactly
/// as recorded, and made durable before this returns.
///
/// The file must continue the target exactly at its head: an empty store
/// takes a file that starts at position 1; a store at head `h` takes one
/// that starts at `h + 1`, or one that overlaps it, which resumes an
/// interrupted import: the overlapping part is skipped once the event at
/// the junction is found identical in both. `progress(done, total)` is
/// called after each batch.
///
/// # Errors
/// [`OpsError::BadFile`] (nothing written); [`OpsError::NotAtHead`] when
/// the file starts past `h + 1`, and [`OpsError::Diverged`] when the
/// store holds other events than the file (nothing written);
/// [`OpsError::Refused`] when an event cannot continue a stream (its batch
/// is not written; the batches before it are, a gapless prefix that a
/// fixed file continues); the store's.
pub async fn import(
    target: &dyn ImportTarget,
    path: impl AsRef<Path>,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<ImportSummary, OpsError> {
    let path = path.as_ref();
    let scanned = scan_file(path, false)?;
    let first = scanned.header.first_position;
    let last = scanned.last_position;
    let head = target.import_head().await?.0;
    if first > head + 1 {
        return Err(OpsError::NotAtHead {
            head,
            first_position: first,
        });
    }
    // The last position both hold: there they must agree.
    let junction = head.min(last);
    let mut summary = ImportSummary {
        first_position: first,
        last_position: last,
        imported: 0,
        already_present: 0,
        head,
    };
    let total = last.saturating_sub(head.max(first - 1));
    progress(0, total);
    let mut reader = open_reader(path)?;
    reader.next()?; // the header, checked above
    while let Some(frame) = reader.next()? {
        if frame.kind != EVENTS {
            break;
        }
        let events: Vec<ExportedEvent> = reader.decode(&frame.body)?;
        let mut batch = Vec::with_capacity(events.len());
        for event in events {
            let position = event.position;
            let event = event
                .into_recorded()
                .map_err(|reason| OpsError::Refused { position, reason })?;
            if position <= head {
                summary.already_present += 1;
                if position == junction {
                    let stored = target.import_event_at(Position(position)).await?;
                    if stored.as_ref() != Some(&event) {
                        return Err(OpsError::Diverged {
                            position,
                            reason: match stored {
                                None => "the store has no event there".into(),
                                Some(stored) => format!(
                                    "the store holds {} version {} (event {}), the file {} \
                                     version {} (event {})",
                                    stored.stream_id,
                                    stored.version,
                                    stored.event_id,
                                    event.stream_id,
                                    event.version,
                                    event.event_id
                                ),
                            },
                        });
                    }
                }
                continue;
            }
            batch.push(event);
        }
        if !batch.is_empty() {
            let count = batch.len() as u64;
            target.import_batch(batch).await?;
            summary.imported += count;
            progress(summary.imported, total);
        }
    }
    target.import_finish().await?;
    summary.head = head.max(last);
    Ok(summary)
}
