//! The `annals` command-line tool, as a library function so that a service
//! can build its own binary with [`PayloadDecoders`] for its event types
//! (`src/bin/annals.rs` is [`main_with`] with none). Behind the default
//! `cli` feature.
//!
//! Exit codes: 0 success; 1 a check found violations or an operation
//! failed; 2 refused before anything was written (bad arguments, a store
//! locked by another process, a store of another format, a missing store,
//! a confirmation not given, an export file that cannot be imported).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::{json, Value};

use super::error::OpsError;
use super::inspect::Inspect;
use super::transfer::{ExportOptions, ImportTarget, SledImport};
use crate::codec::{decode_event, DomainEvent};
use crate::error::StoreError;
use crate::event::{EventFilter, Position, ReadDirection, RecordedEvent, StreamId, Version};
use crate::store::{EventStore, PostgresConfig, PostgresStore, SledStore, SledStoreConfig};

type Decoder = Box<dyn Fn(&RecordedEvent) -> Option<Value> + Send + Sync>;

/// Decoders that show payloads as JSON: the tool cannot know a service's
/// event types, so a service that wants readable payloads builds its own
/// binary with `PayloadDecoders::new().with::<OrderEvent>()` and
/// [`main_with`]. A payload no decoder knows is shown as its length and
/// hex bytes.
#[derive(Default)]
pub struct PayloadDecoders {
    decoders: Vec<Decoder>,
}

impl std::fmt::Debug for PayloadDecoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PayloadDecoders({} types)", self.decoders.len())
    }
}

impl PayloadDecoders {
    /// No decoders: every payload shown as hex.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the event enum `E`: an event whose type is one of `E`'s
    /// variants (or a name `E` upcasts) is decoded with `E`'s codec and
    /// shown as JSON.
    pub fn with<E: DomainEvent>(mut self) -> Self {
        self.decoders.push(Box::new(|event| {
            decode_event::<E>(event)
                .ok()
                .and_then(|decoded| serde_json::to_value(decoded).ok())
        }));
        self
    }

    /// The payload of `event` as JSON, if a decoder knows its type.
    pub fn decode(&self, event: &RecordedEvent) -> Option<Value> {
        self.decoders.iter().find_map(|decoder| decoder(event))
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "annals",
    version,
    about = "Inspect, check and move an annals event store",
    long_about = "Inspect, check and move an annals event store: a sled store directory, or a \
                  PostgreSQL URL (postgres://...) with --schema. A sled store is locked by the \
                  process that has it open: stop that process (or use its own tools) first."
)]
struct Args {
    /// The store: a sled directory, or a postgres:// URL.
    store: String,
    /// The PostgreSQL schema of the store (default: annals).
    #[arg(long, global = true)]
    schema: Option<String>,
    /// Print JSON lines instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Open a sled store that recovered fewer events than it had
    /// acknowledged (damage, or a disk that lost what it had synced): the
    /// loss is accepted and the store's acknowledged mark lowered to what
    /// it holds, durably. Without it such a store is refused.
    #[arg(long, global = true)]
    accept_lost_events: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Events, streams, categories, head, format, size, snapshots, checkpoints.
    Stats,
    /// Streams with their versions and last events.
    Streams {
        /// Only this category.
        #[arg(long)]
        category: Option<String>,
        /// At most this many streams.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Events of one stream.
    Read {
        /// The stream id.
        stream: String,
        /// Start at this version (default: the first, or the last with --backward).
        #[arg(long)]
        from: Option<u64>,
        /// Newest first.
        #[arg(long)]
        backward: bool,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Events of the whole log, in position order.
    ReadAll {
        /// Start at this position.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Only this category.
        #[arg(long)]
        category: Option<String>,
        /// Only these event types (repeat the flag for several).
        #[arg(long = "type")]
        types: Vec<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The last events of the log; with --follow, then every new one.
    Tail {
        /// Only this category.
        #[arg(long)]
        category: Option<String>,
        /// Keep printing events as they are committed (on PostgreSQL, also
        /// other processes' commits).
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many of the last events to print first.
        #[arg(long, short = 'n', default_value_t = 10)]
        lines: usize,
    },
    /// Check the store's invariants; exits 1 with a report on any violation.
    Verify,
    /// Write the log to a file (resumable).
    Export {
        /// The file to write.
        file: PathBuf,
        /// Continue an interrupted export in FILE.
        #[arg(long)]
        resume: bool,
        /// The first position to export.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Load an export file; it must continue the store at its head (a
    /// second run resumes an interrupted import).
    Import {
        /// The export file.
        file: PathBuf,
    },
    /// Upgrade a sled store of format 2 to this build's format, in place
    /// (a second run finishes an interrupted upgrade).
    Upgrade,
    /// List checkpoints, or set or delete one (a projection's, offline).
    Checkpoints {
        #[command(subcommand)]
        action: Option<CheckpointAction>,
    },
}

#[derive(Debug, Subcommand)]
enum CheckpointAction {
    /// Set checkpoint NAME to POSITION (0: replay from the start).
    Set {
        /// The checkpoint's name.
        name: String,
        /// The position.
        position: u64,
        /// Confirm: without it nothing is written.
        #[arg(long)]
        yes: bool,
    },
    /// Delete checkpoint NAME.
    Delete {
        /// The checkpoint's name.
        name: String,
        /// Confirm: without it nothing is written.
        #[arg(long)]
        yes: bool,
    },
}

/// Why the tool stops, with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn refused(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<OpsError> for Failure {
    fn from(error: OpsError) -> Self {
        match error {
            OpsError::Store(store) => store_failure(store),
            error @ (OpsError::InvalidInput(_)
            | OpsError::PastHead { .. }
            | OpsError::BadFile { .. }
            | OpsError::FileExists(_)
            | OpsError::NotAtHead { .. }
            | OpsError::Diverged { .. }) => Failure::refused(format!("annals: {error}")),
            error => Failure {
                code: 1,
                message: format!("annals: {error}"),
            },
        }
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        store_failure(error)
    }
}

impl From<crate::error::ReadError> for Failure {
    fn from(error: crate::error::ReadError) -> Self {
        Failure::from(OpsError::from(error))
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Failure {
            code: 1,
            message: format!("annals: {error}"),
        }
    }
}

fn store_failure(error: StoreError) -> Failure {
    match error {
        StoreError::InUse { path } => Failure::refused(format!(
            "annals: the store {} is in use{}.\n\
             A sled store is locked by the one process that has it open; nothing was read or \
             written. Stop that process (or ask it through its own endpoints) and run this \
             again.",
            path.display(),
            lock_holder(&path)
                .map(|holder| format!(" by {holder}"))
                .unwrap_or_default()
        )),
        StoreError::FormatMismatch {
            found: found @ (2..=4),
            expected,
        } => Failure::refused(format!(
            "annals: the store has format version {found} (or its upgrade was interrupted); \
             this annals reads version {expected}. Run `annals <store> upgrade` to upgrade it \
             in place; nothing was changed."
        )),
        StoreError::FormatMismatch { found, expected } => Failure::refused(format!(
            "annals: the store has format version {found}; this annals reads version {expected}. \
             Use the annals release that wrote it (or a newer one); nothing was changed."
        )),
        StoreError::ShorterThanAcknowledged {
            acknowledged,
            recovered,
        } => Failure::refused(format!(
            "annals: the store holds events up to position {}, but it had acknowledged \
             up to {}: sled recovered a shorter log (a damaged file, or a disk \
             that lost synced writes). Nothing was read or written. Keep a copy of the \
             directory, then add --accept-lost-events to open (or upgrade) it as it is.",
            recovered.0, acknowledged.0
        )),
        error @ (StoreError::NotAStore(_) | StoreError::InvalidInput(_)) => {
            Failure::refused(format!("annals: {error}"))
        }
        error => Failure {
            code: 1,
            message: format!("annals: {error}"),
        },
    }
}

/// The process holding the flock of a sled store's `db` file, from
/// `/proc/locks` (Linux), as "process PID (command line)".
fn lock_holder(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(path.join("db")).ok()?.ino();
    let holder = |locks: &str| {
        locks.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (pid, file) = (fields.get(4)?, fields.get(5)?);
            let lock_inode: u64 = file.rsplit(':').next()?.parse().ok()?;
            (fields.get(1) == Some(&"FLOCK") && lock_inode == inode).then(|| pid.to_string())
        })
    };
    // The kernel writes `/proc/locks` a page at a time from a list that
    // other processes change meanwhile, so one read can miss a line (a CI
    // run once named no holder for a store held all along, while other
    // tests opened and closed stores beside it): read again.
    // A file that cannot be read is not read again.
    let mut pid = None;
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        pid = holder(&std::fs::read_to_string("/proc/locks").ok()?);
        if pid.is_some() {
            break;
        }
    }
    let pid = pid?;
    let command = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .split('\0')
                .filter(|part| !part.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|command| !command.is_empty());
    Some(match command {
        Some(command) => format!("process {pid} ({command})"),
        None => format!("process {pid}"),
    })
}

/// A store the tool opened.
enum Opened {
    Sled(Arc<SledStore>),
    Postgres(Arc<PostgresStore>),
}

impl Opened {
    fn inspect(&self) -> &dyn Inspect {
        match self {
            Opened::Sled(store) => &**store,
            Opened::Postgres(store) => &**store,
        }
    }

    fn event_store(&self) -> Arc<dyn EventStore> {
        match self {
            Opened::Sled(store) => Arc::clone(store) as Arc<dyn EventStore>,
            Opened::Postgres(store) => Arc::clone(store) as Arc<dyn EventStore>,
        }
    }

    async fn close(self) -> Result<(), StoreError> {
        match self {
            Opened::Sled(store) => store.shutdown().await,
            Opened::Postgres(store) => store.shutdown().await,
        }
    }
}

fn is_postgres(store: &str) -> bool {
    store.starts_with("postgres://") || store.starts_with("postgresql://")
}

fn postgres_config(args: &Args) -> PostgresConfig {
    let config = PostgresConfig::new(&args.store);
    match &args.schema {
        Some(schema) => config.schema(schema),
        None => config,
    }
}

/// Opens an existing store; a sled path that holds no store is refused
/// rather than created.
fn open(args: &Args) -> Result<Opened, Failure> {
    if is_postgres(&args.store) {
        return Ok(Opened::Postgres(Arc::new(PostgresStore::open(
            postgres_config(args),
        )?)));
    }
    let path = Path::new(&args.store);
    if !path.join("db").is_file() || !path.join("conf").is_file() {
        return Err(Failure::refused(format!(
            "annals: no annals store at {}",
            path.display()
        )));
    }
    let config = SledStoreConfig::new(path).accept_lost_events(args.accept_lost_events);
    Ok(Opened::Sled(Arc::new(SledStore::open_with(config)?)))
}

/// Runs the tool on the process's arguments with `decoders` for payloads,
/// and returns its exit code (see the module documentation).
pub fn main_with(decoders: PayloadDecoders) -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            // clap prints help and version with code 0, usage errors with 2.
            let _ = error.print();
            return ExitCode::from(error.exit_code() as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("annals: cannot start: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args, &decoders)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("{}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(args: Args, decoders: &PayloadDecoders) -> Result<u8, Failure> {
    if let Command::Import { file } = &args.command {
        return import(&args, file).await;
    }
    if let Command::Upgrade = &args.command {
        return upgrade(&args).await;
    }
    // Confirmation first: nothing is opened for a refused edit.
    if let Command::Checkpoints {
        action:
            Some(
                CheckpointAction::Set { yes: false, .. }
                | CheckpointAction::Delete { yes: false, .. },
            ),
    } = &args.command
    {
        return Err(Failure::refused(
            "annals: changing a checkpoint rewinds or resets its projection: add --yes to \
             confirm (stop the projection first); nothing was written",
        ));
    }
    let opened = open(&args)?;
    let result = command(&args, &opened, decoders).await;
    let closed = opened.close().await;
    let code = result?;
    closed?;
    Ok(code)
}

async fn command(args: &Args, opened: &Opened, decoders: &PayloadDecoders) -> Result<u8, Failure> {
    let store = opened.inspect();
    let mut out = std::io::stdout().lock();
    match &args.command {
        Command::Stats => {
            let stats = super::stats(store).await?;
            if args.json {
                line(&mut out, &stats)?;
            } else {
                print_stats(&mut out, &stats)?;
            }
        }
        Command::Streams { category, limit } => {
            let streams = super::streams(store, category.as_deref(), *limit).await?;
            if args.json {
                for stream in &streams {
                    line(&mut out, stream)?;
                }
            } else {
                writeln!(
                    out,
                    "{:<32} {:>8} {:>10} {:>10}  {:<24} LAST RECORDED",
                    "STREAM", "VERSION", "FIRST POS", "LAST POS", "LAST TYPE"
                )?;
                for s in &streams {
                    writeln!(
                        out,
                        "{:<32} {:>8} {:>10} {:>10}  {:<24} {}",
                        s.stream,
                        s.version,
                        s.first_position,
                        s.last_position,
                        s.last_event_type,
                        timestamp(s.last_recorded_at_micros)
                    )?;
                }
            }
        }
        Command::Read {
            stream,
            from,
            backward,
            limit,
        } => {
            let stream =
                StreamId::new(stream).map_err(|e| Failure::refused(format!("annals: {e}")))?;
            let (direction, default_from) = if *backward {
                (ReadDirection::Backward, Version::MAX)
            } else {
                (ReadDirection::Forward, Version::FIRST)
            };
            let from = from.map_or(default_from, Version);
            let events = store
                .read_stream(&stream, from, direction, (*limit).max(1))
                .await?;
            print_events(&mut out, args.json, decoders, &events, true)?;
        }
        Command::ReadAll {
            from,
            category,
            types,
            limit,
        } => {
            let filter = filter(category, types)?;
            let events = store
                .read_all(
                    Position(*from),
                    ReadDirection::Forward,
                    (*limit).max(1),
                    &filter,
                )
                .await?;
            print_events(&mut out, args.json, decoders, &events, true)?;
        }
        Command::Tail {
            category,
            follow,
            lines,
        } => {
            let filter = filter(category, &[])?;
            let head = store.stored_head().await?;
            let mut last = store
                .read_all(head, ReadDirection::Backward, (*lines).max(1), &filter)
                .await?;
            last.reverse();
            if *lines > 0 {
                print_events(&mut out, args.json, decoders, &last, true)?;
            }
            out.flush()?;
            if *follow {
                let mut subscription =
                    crate::projection::subscribe(opened.event_store(), head, filter);
                let mut header = *lines == 0;
                while let Some(event) = subscription.next().await {
                    let event = event.map_err(|e| Failure {
                        code: 1,
                        message: format!("annals: {e}"),
                    })?;
                    print_events(&mut out, args.json, decoders, &[event], header)?;
                    header = false;
                    out.flush()?;
                }
            }
        }
        Command::Verify => {
            let report = super::verify(store).await?;
            if args.json {
                for violation in &report.violations {
                    line(&mut out, violation)?;
                }
                line(
                    &mut out,
                    &json!({
                        "backend": report.backend, "head": report.head,
                        "events": report.events, "streams": report.streams,
                        "snapshots": report.snapshots, "index_entries": report.index_entries,
                        "violations": report.violations.len(), "sound": report.is_sound(),
                    }),
                )?;
            } else {
                for violation in &report.violations {
                    writeln!(out, "VIOLATION {violation}")?;
                }
                writeln!(
                    out,
                    "checked {} events up to position {}, {} streams, {} snapshots, {} index \
                     entries ({}): {}",
                    report.events,
                    report.head,
                    report.streams,
                    report.snapshots,
                    report.index_entries,
                    report.backend,
                    if report.is_sound() {
                        "no violation".to_owned()
                    } else {
                        format!("{} violations", report.violations.len())
                    }
                )?;
            }
            if !report.is_sound() {
                return Ok(1);
            }
        }
        Command::Export { file, resume, from } => {
            let bar = progress_bar(args.json, "exporting");
            let mut progress = |done: u64, total: u64| {
                if let Some(bar) = &bar {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            };
            let options = ExportOptions::default()
                .from(Position(*from))
                .resume(*resume);
            let summary = super::export(store, file, options, &mut progress).await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if args.json {
                line(&mut out, &summary)?;
            } else {
                writeln!(
                    out,
                    "exported positions {}..{} ({} events, {} written now) to {} ({} bytes)",
                    summary.first_position,
                    summary.last_position,
                    summary.events,
                    summary.written,
                    file.display(),
                    summary.bytes
                )?;
            }
        }
        Command::Import { .. } | Command::Upgrade => unreachable!("handled before opening"),
        Command::Checkpoints { action } => {
            checkpoints(args, store, action.as_ref(), &mut out).await?
        }
    }
    Ok(0)
}

async fn checkpoints(
    args: &Args,
    store: &dyn Inspect,
    action: Option<&CheckpointAction>,
    out: &mut impl Write,
) -> Result<(), Failure> {
    match action {
        None => {
            let head = store.stored_head().await?.0;
            let checkpoints = store.checkpoints().await?;
            if !args.json {
                writeln!(
                    out,
                    "{:<40} {:>10} {:>10}",
                    "CHECKPOINT", "POSITION", "BEHIND"
                )?;
            }
            for (name, position) in checkpoints {
                let behind = head.saturating_sub(position.0);
                if args.json {
                    line(
                        out,
                        &json!({"name": name, "position": position.0, "behind": behind}),
                    )?;
                } else {
                    writeln!(out, "{name:<40} {:>10} {behind:>10}", position.0)?;
                }
            }
        }
        Some(CheckpointAction::Set { name, position, .. }) => {
            let old = super::set_checkpoint(store, name, Position(*position)).await?;
            let old = old.map(|p| p.0);
            if args.json {
                line(
                    out,
                    &json!({"name": name, "position": position, "previous": old}),
                )?;
            } else {
                writeln!(
                    out,
                    "checkpoint {name}: {} -> {position}",
                    old.map_or("none".to_owned(), |p| p.to_string())
                )?;
            }
        }
        Some(CheckpointAction::Delete { name, .. }) => {
            let deleted = super::delete_checkpoint(store, name).await?;
            if args.json {
                line(out, &json!({"name": name, "deleted": deleted}))?;
            } else if deleted {
                writeln!(out, "checkpoint {name} deleted")?;
            } else {
                writeln!(out, "checkpoint {name} did not exist")?;
            }
        }
    }
    Ok(())
}

async fn import(args: &Args, file: &Path) -> Result<u8, Failure> {
    // Check the file before taking the store, so that a bad file is refused
    // without creating or locking anything.
    if !file.is_file() {
        return Err(Failure::refused(format!(
            "annals: {}: no such export file",
            file.display()
        )));
    }
    let contents = super::inspect_export(file)?;
    if !is_postgres(&args.store) && !Path::new(&args.store).exists() && contents.first_position > 1
    {
        return Err(OpsError::NotAtHead {
            head: 0,
            first_position: contents.first_position,
        }
        .into());
    }
    let target: Box<dyn ImportTarget> = if is_postgres(&args.store) {
        Box::new(PostgresStore::open(postgres_config(args))?)
    } else {
        Box::new(SledImport::open(&args.store)?)
    };
    let bar = progress_bar(args.json, "importing");
    let mut progress = |done: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let result = super::import(&*target, file, &mut progress).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Release the store whatever happened (a refused import wrote only
    // whole batches).
    let finished = target.import_finish().await;
    let summary = result?;
    finished?;
    let mut out = std::io::stdout().lock();
    if args.json {
        line(&mut out, &summary)?;
    } else {
        writeln!(
            out,
            "imported {} events (positions {}..{}; {} were present already); head {}",
            summary.imported,
            summary.first_position,
            summary.last_position,
            summary.already_present,
            summary.head
        )?;
    }
    Ok(0)
}

async fn upgrade(args: &Args) -> Result<u8, Failure> {
    if is_postgres(&args.store) {
        return Err(Failure::refused(
            "annals: upgrade is for sled stores; a PostgreSQL schema has no other format yet",
        ));
    }
    let config = SledStoreConfig::new(&args.store).accept_lost_events(args.accept_lost_events);
    let summary = tokio::task::spawn_blocking(move || SledStore::upgrade_with(&config))
        .await
        .map_err(|e| Failure {
            code: 1,
            message: format!("annals: the upgrade stopped: {e}"),
        })??;
    let mut out = std::io::stdout().lock();
    if args.json {
        line(&mut out, &summary)?;
    } else if summary.found_format == crate::store::FORMAT_VERSION {
        writeln!(
            out,
            "the store is already format {}; nothing was changed",
            summary.found_format
        )?;
    } else {
        writeln!(
            out,
            "upgraded {} events from format {} to {} ({} chunks written)",
            summary.events,
            summary.found_format,
            crate::store::FORMAT_VERSION,
            summary.chunks_written
        )?;
    }
    Ok(0)
}

fn progress_bar(json: bool, what: &'static str) -> Option<indicatif::ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} events ({per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    Some(bar)
}

fn filter(category: &Option<String>, types: &[String]) -> Result<EventFilter, Failure> {
    match (category, types) {
        (Some(_), [_, ..]) => Err(Failure::refused(
            "annals: give --category or --type, not both",
        )),
        (Some(category), []) => Ok(EventFilter::Category(category.clone())),
        (None, []) => Ok(EventFilter::All),
        (None, types) => Ok(EventFilter::EventTypes(types.to_vec())),
    }
}

fn line(out: &mut impl Write, value: &impl Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string(value).map_err(|e| Failure {
        code: 1,
        message: format!("annals: {e}"),
    })?;
    writeln!(out, "{text}")?;
    Ok(())
}

fn print_stats(out: &mut impl Write, stats: &super::StoreSummary) -> std::io::Result<()> {
    writeln!(
        out,
        "backend       {} (format {})",
        stats.backend, stats.format_version
    )?;
    writeln!(out, "head          {}", stats.head)?;
    writeln!(out, "events        {}", stats.events)?;
    writeln!(out, "streams       {}", stats.streams)?;
    writeln!(out, "size on disk  {}", bytes(stats.size_on_disk_bytes))?;
    writeln!(out, "snapshots     {}", stats.snapshots)?;
    writeln!(out, "categories    {}", stats.categories.len())?;
    for c in &stats.categories {
        writeln!(
            out,
            "  {:<24} {:>8} streams {:>10} events",
            c.category, c.streams, c.events
        )?;
    }
    writeln!(out, "checkpoints   {}", stats.checkpoints.len())?;
    for c in &stats.checkpoints {
        writeln!(
            out,
            "  {:<24} at {:>10}, {:>8} behind",
            c.name, c.position, c.behind
        )?;
    }
    Ok(())
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB ({n} bytes)", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB ({n} bytes)", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB ({n} bytes)", n as f64 / 1024.0),
        n => format!("{n} bytes"),
    }
}

/// An event as a JSON line prints it.
fn event_json(event: &RecordedEvent, decoders: &PayloadDecoders) -> Value {
    let extra: HashMap<&str, &str> = event
        .metadata
        .extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut value = json!({
        "position": event.position.0,
        "stream": event.stream_id.as_str(),
        "version": event.version.0,
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "event_id": event.event_id,
        "recorded_at_micros": event.recorded_at_micros,
        "recorded_at": timestamp(event.recorded_at_micros),
        "correlation_id": event.metadata.correlation_id,
        "causation_id": event.metadata.causation_id,
        "extra": extra,
        "payload_len": event.payload.len(),
    });
    match decoders.decode(event) {
        Some(payload) => value["payload"] = payload,
        None => value["payload_hex"] = Value::String(hex(&event.payload)),
    }
    value
}

fn print_events(
    out: &mut impl Write,
    json: bool,
    decoders: &PayloadDecoders,
    events: &[RecordedEvent],
    header: bool,
) -> Result<(), Failure> {
    if json {
        for event in events {
            line(out, &event_json(event, decoders))?;
        }
        return Ok(());
    }
    if header {
        writeln!(
            out,
            "{:>10}  {:<28} {:>7}  {:<24} {:<27} PAYLOAD",
            "POSITION", "STREAM", "VERSION", "TYPE", "RECORDED AT"
        )?;
    }
    for event in events {
        let payload = match decoders.decode(event) {
            Some(value) => value.to_string(),
            None => {
                let shown = &event.payload[..event.payload.len().min(24)];
                let more = if event.payload.len() > shown.len() {
                    "…"
                } else {
                    ""
                };
                format!("len={} hex={}{more}", event.payload.len(), hex(shown))
            }
        };
        writeln!(
            out,
            "{:>10}  {:<28} {:>7}  {:<24} {:<27} {payload}",
            event.position.0,
            event.stream_id.as_str(),
            event.version.0,
            event.event_type,
            timestamp(event.recorded_at_micros)
        )?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `2026-11-30T15:44:07.123456Z` from microseconds since the epoch (UTC,
/// the proleptic Gregorian calendar; days to civil date after Howard
/// Hinnant's algorithm).
fn timestamp(micros: u64) -> String {
    let seconds = micros / 1_000_000;
    let (days, of_day) = ((seconds / 86_400) as i64, seconds % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        micros % 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T12:34:56.000789Z, a leap day.
        assert_eq!(
            timestamp(1_709_210_096_000_789),
            "2024-02-29T12:34:56.000789Z"
        );
        assert_eq!(
            timestamp(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
